"""The ``prefixcache`` command line."""

from __future__ import annotations

import argparse
import sys
import time

from prefixcache.config import KV_CACHE_DTYPES, LOAD_FORMATS

DEFAULT_PROMPT = "Tell me about prefix caching."
DEFAULT_SERVED_NAME = "prefixcache/tiny-random"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prefixcache`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as exc:
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
    _add_serve_parser(commands)
    return parser


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    serve.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: --model)"
    )
    serve.add_argument("--host-cache-tokens", type=int, default=0, help="host-memory KV tier")
    serve.add_argument("--disk-cache-dir", default=None, help="folder for the disk KV tier")
    serve.add_argument(
        "--disk-cache-bytes", type=int, default=None, help="size bound of the disk KV tier"
    )
    serve.add_argument(
        "--kv-store",
        default=None,
        help="a Redis shared by several servers as the last KV tier, "
        "e.g. redis://127.0.0.1:6379/0 (needs prefixcache[cluster])",
    )
    serve.add_argument(
        "--responses-dir",
        default=None,
        help="folder that keeps the Responses API's stored conversations across restarts "
        "(default: <disk-cache-dir>/responses, else memory only)",
    )
    serve.add_argument("--max-num-seqs", type=int, default=128, help="requests run at once")
    serve.add_argument("--max-num-batched-tokens", type=int, default=None)
    serve.add_argument(
        "--step-time-target-ms",
        type=float,
        default=None,
        help="prefill per step sized to keep a step within this time (default: 75 on CPU, "
        "off on GPU; 0: a fixed budget of --max-num-batched-tokens)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=512, help="requests waiting beyond those (then 429)"
    )
    serve.add_argument(
        "--api-key", action="append", default=[], help="accepted bearer key (repeatable)"
    )
    serve.add_argument("--api-keys-file", default=None, help="file of keys, one per line")
    serve.add_argument(
        "--admin-api-key",
        action="append",
        default=[],
        help="accepted key that may act on every tenant, e.g. flush the whole cache (repeatable)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="seconds to receive a whole request body (then 408)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds running requests get to finish before their "
        "streams are ended (new requests get 503 meanwhile)",
    )
    serve.add_argument(
        "--metrics-api-key", default=None, help="bearer key /metrics needs (default: open)"
    )
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    serve.add_argument(
        "--engine-in-process",
        action="store_true",
        help="run the engine on a thread of the HTTP process instead of in its own process",
    )
    _add_cluster_args(serve)
    serve.set_defaults(handler=_serve)


def _add_cluster_args(serve: argparse.ArgumentParser) -> None:
    cluster = serve.add_argument_group("replicas on Ray Serve (the cluster extra)")
    cluster.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="serve N engine replicas on Ray Serve behind one ingress (default: one "
        "engine in this process)",
    )
    cluster.add_argument(
        "--ray-address",
        default=None,
        help="join this running Ray cluster (default: start a local Ray instance)",
    )
    cluster.add_argument(
        "--router",
        default="affinity",
        choices=("affinity", "default"),
        help="affinity: PrefixAffinityRouter (by cached chunk chains); default: Serve's",
    )
    cluster.add_argument(
        "--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica reserves"
    )
    cluster.add_argument(
        "--ray-num-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray instance (default: all of this machine's)",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder or hub id (default: tiny)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-tokens", type=int, default=None)
    parser.add_argument(
        "--kv-cache-memory",
        type=int,
        default=None,
        help="device KV pool budget in bytes, instead of --kv-cache-tokens",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="store KV at the model's dtype (auto) or quantized: int8, fp8 (e4m3)",
    )
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="shard the model over N ranks: this process and N-1 workers (gloo on CPU, "
        "nccl on CUDA with one device per rank)",
    )
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on CUDA, run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument(
        "--window-kv-cache-tokens",
        type=int,
        default=None,
        help="KV pool of the sliding-window layers (hybrid KV cache); default: sized per window",
    )
    parser.add_argument(
        "--no-hybrid-kv-cache",
        action="store_true",
        help="give sliding-window layers a full KV pool like the global layers",
    )


def _load_engine(args: argparse.Namespace, **options):
    """The engine the arguments ask for; ``options`` go on to ``Engine.from_pretrained``."""
    from prefixcache import Engine

    model, options = _engine_options(args, **options)
    return Engine.from_pretrained(model, **options)


def _engine_options(args: argparse.Namespace, **options) -> tuple[str, dict]:
    """The model and the ``Engine.from_pretrained`` options the arguments ask for."""
    model = args.model or str(_default_model(args))
    return model, dict(
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        attention_backend=args.attention_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        load_format=args.load_format,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=not args.no_prefix_caching,
        hybrid_kv_cache=False if args.no_hybrid_kv_cache else None,
        window_kv_cache_tokens=args.window_kv_cache_tokens,
        **options,
    )


def _default_model(args: argparse.Namespace):
    """The embedded tiny model's folder, said so on stderr."""
    from prefixcache.testing import default_model_path

    model = default_model_path()
    print(
        f"prefixcache: no --model given; using the embedded tiny model at {model}. "
        "Its weights are random, so its text is gibberish.",
        file=sys.stderr,
    )
    return model


def _serve(args: argparse.Namespace) -> int:
    import logging

    from server.auth import read_keys_file
    from server.launch import serve

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    keys = list(args.api_key) + (read_keys_file(args.api_keys_file) if args.api_keys_file else [])
    if (args.api_key or args.api_keys_file) and not any(keys):
        raise ValueError("--api-key / --api-keys-file gave no usable key")
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    options = {"max_num_seqs": args.max_num_seqs, "host_cache_tokens": args.host_cache_tokens}
    if args.max_num_batched_tokens is not None:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.step_time_target_ms is not None:
        options["step_time_target_ms"] = args.step_time_target_ms
    if args.disk_cache_dir is not None:
        options["disk_cache_dir"] = args.disk_cache_dir
    if args.disk_cache_bytes is not None:
        options["disk_cache_bytes"] = args.disk_cache_bytes
    if args.kv_store is not None:
        options["kv_store"] = args.kv_store
    if args.replicas is not None:
        if args.tensor_parallel_size != 1:
            raise ValueError("--tensor-parallel-size cannot be combined with --replicas")
        return _serve_cluster(args, keys, options)
    if args.ray_address is not None:
        raise ValueError("--ray-address needs --replicas")
    model, engine_options = _engine_options(args, **options)
    serve(
        model,
        engine_options,
        engine_in_process=args.engine_in_process,
        model_name=args.served_model_name or args.model or DEFAULT_SERVED_NAME,
        host=args.host,
        port=args.port,
        api_keys=keys,
        admin_api_keys=args.admin_api_key,
        max_queue=args.max_queue,
        log_level=args.log_level,
        random_weights=args.model is None or args.load_format == "dummy",
        responses_dir=args.responses_dir,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        metrics_api_key=args.metrics_api_key,
    )
    return 0


def _serve_cluster(args: argparse.Namespace, keys: list[str], options: dict) -> int:
    """``serve`` with ``--replicas``: the same app on Ray Serve replicas."""
    from prefixcache.cluster.app import ClusterOptions
    from prefixcache.cluster.launch import serve_cluster

    cluster = ClusterOptions(
        num_replicas=args.replicas, router=args.router, replica_cpus=args.replica_cpus
    )
    engine_options = dict(
        options,
        model=args.model or str(_default_model(args)),
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        attention_backend=args.attention_backend,
        load_format=args.load_format,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    serve_cluster(
        engine_options,
        model_name=args.served_model_name or args.model or DEFAULT_SERVED_NAME,
        cluster=cluster,
        host=args.host,
        port=args.port,
        ray_address=args.ray_address,
        ray_num_cpus=args.ray_num_cpus,
        app_options={
            "api_keys": keys,
            "admin_api_keys": args.admin_api_key,
            "max_queue": args.max_queue,
            "request_timeout": args.request_timeout,
            "shutdown_timeout": args.shutdown_timeout,
            "metrics_api_key": args.metrics_api_key,
        },
        responses_dir=args.responses_dir,
        random_weights=args.model is None or args.load_format == "dummy",
    )
    return 0


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
