"""The ``prefixcache`` command line."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPT = "Tell me about prefix caching."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prefixcache`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"prefixcache: error: {exc}", file=sys.stderr)
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for a prompt and print it")
    _add_model_args(gen)
    gen.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(handler=_generate)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder or hub id (default: tiny)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-tokens", type=int, default=None)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--no-prefix-caching", action="store_true")


def _load_engine(args: argparse.Namespace):
    from prefixcache import Engine
    from prefixcache.testing import default_model_path

    model = args.model
    if model is None:
        model = str(default_model_path())
        print(
            f"prefixcache: no --model given; using the embedded tiny model at {model}. "
            "Its weights are random, so its text is gibberish.",
            file=sys.stderr,
        )
    return Engine.from_pretrained(
        model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        attention_backend=args.attention_backend,
        load_format=args.load_format,
        enable_prefix_caching=not args.no_prefix_caching,
    )


def _generate(args: argparse.Namespace) -> int:
    from prefixcache import SamplingParams

    engine = _load_engine(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    start = time.perf_counter()
    if args.chat:
        out = engine.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = engine.generate(args.prompt, params)[0]
    elapsed = time.perf_counter() - start
    print(out.text)
    print(
        f"[{len(out.prompt_token_ids)} prompt tokens, {len(out.token_ids)} generated, "
        f"finish={out.finish_reason}, {elapsed:.2f}s on {engine.device}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
