"""Concurrent chat throughput and time to first token: our engine versus HF ``generate``.

All three systems run in this process on the same weights: our continuous-batching
engine with N requests at once, HF transformers one request at a time, and HF with
one left-padded batch. Each request generates exactly ``--max-tokens`` tokens.

    python bench/throughput.py --num-requests 16 --out bench/out

With ``--tensor-parallel-size N`` our engine also runs sharded over N ranks (``gloo``
worker processes on CPU) on the same requests, reported against one rank.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import bar_chart, write_report  # noqa: E402

from prefixcache import Engine, SamplingParams  # noqa: E402
from prefixcache.testing import default_model_path  # noqa: E402

WORDS = [
    "cache",
    "prefix",
    "token",
    "block",
    "radix",
    "tree",
    "turn",
    "reply",
    "model",
    "serve",
    "chunk",
    "hash",
    "long",
]


def _conversations(count: int, words: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [
        [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))}]
        for _ in range(count)
    ]


def run_ours(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """All requests at once through the step loop; TTFT from the first delta."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    generated = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            first.setdefault(delta.request_id, time.perf_counter() - start)
            generated += len(delta.token_ids)
    elapsed = time.perf_counter() - start
    return _result("prefixcache", generated, elapsed, [first[i] for i in ids])


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf_sequential(hf, prompts: list[list[int]], max_tokens: int) -> dict:
    """One request after another, as a plain HF loop serves concurrent arrivals."""
    start = time.perf_counter()
    ttfts, generated = [], 0
    for prompt in prompts:
        clock = _FirstTokenClock()
        out = _hf_generate(hf, torch.tensor([prompt]), None, max_tokens, clock)
        ttfts.append(clock.first - start)
        generated += out.shape[1] - len(prompt)
    return _result("hf generate, one at a time", generated, time.perf_counter() - start, ttfts)


def run_hf_padded(hf, prompts: list[list[int]], max_tokens: int, pad_id: int) -> dict:
    """All requests as one left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    clock = _FirstTokenClock()
    out = _hf_generate(hf, ids, mask, max_tokens, clock)
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - width) * len(prompts)
    return _result(
        "hf generate, padded batch", generated, elapsed, [clock.first - start] * len(prompts)
    )


def _hf_generate(hf, ids, mask, max_tokens: int, streamer):
    with torch.inference_mode():
        return hf.generate(
            ids,
            attention_mask=mask if mask is not None else torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            streamer=streamer,
        )


def _result(system: str, generated: int, elapsed: float, ttfts: list[float]) -> dict:
    ttfts = sorted(ttfts)
    return {
        "system": system,
        "tokens": generated,
        "seconds": elapsed,
        "tokens_per_s": generated / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


def run_tensor_parallel(
    model: str, size: int, prompts: list[list[int]], warm_up: list[list[int]], max_tokens: int
) -> dict:
    """Our engine sharded over ``size`` ranks on the same requests (its own warm-up)."""
    with Engine.from_pretrained(
        model, device="cpu", dtype="float32", kv_cache_tokens=65536, tensor_parallel_size=size
    ) as engine:
        run_ours(engine, warm_up, 4)
        row = run_ours(engine, prompts, max_tokens)
    return dict(row, system=f"prefixcache, tensor-parallel {size}")


def main(argv: list[str] | None = None) -> None:
    """Run the three systems on the same requests and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: embedded tiny)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="folder for JSON, markdown and PNG")
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="also run our engine over N ranks (gloo on CPU), reported against one rank",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or str(default_model_path())
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", kv_cache_tokens=65536)
    prompts = [
        engine.inputs.chat_tokens(c).tolist()
        for c in _conversations(args.num_requests, args.prompt_words, 0)
    ]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    warm_up = [
        engine.inputs.chat_tokens(c).tolist() for c in _conversations(2, args.prompt_words, 99)
    ]
    run_ours(engine, warm_up, 4)  # other prompts than the measured ones: nothing is cached
    rows = [
        run_ours(engine, prompts, args.max_tokens),
        run_hf_sequential(hf, prompts, args.max_tokens),
        run_hf_padded(hf, prompts, args.max_tokens, engine.tokenizer.pad_token_id or 0),
    ]
    ours, sequential, padded = (r["tokens_per_s"] for r in rows)
    size = args.tensor_parallel_size
    if size > 1:
        rows.append(run_tensor_parallel(model, size, prompts, warm_up, args.max_tokens))
    summary = {
        "benchmark": "throughput",
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "tokens_per_s": ours,
        "speedup_vs_hf_sequential": ours / sequential,
        "speedup_vs_hf_padded": ours / padded,
        "ttft_p50_ms": rows[0]["ttft_p50_ms"],
        "ttft_p99_ms": rows[0]["ttft_p99_ms"],
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    if size > 1:
        summary["tensor_parallel_size"] = size
        summary["tensor_parallel_tokens_per_s"] = rows[-1]["tokens_per_s"]
        summary["tensor_parallel_vs_one_rank"] = rows[-1]["tokens_per_s"] / ours
        summary["tensor_parallel_ttft_p50_ms"] = rows[-1]["ttft_p50_ms"]
    if args.out:
        labels = ["prefixcache", "HF sequential", "HF padded"]
        labels += [f"prefixcache TP={size}"] if size > 1 else []
        Path(args.out).mkdir(parents=True, exist_ok=True)
        bar_chart(
            Path(args.out) / "throughput.png",
            labels,
            [r["tokens_per_s"] for r in rows],
            "generated tokens / s",
            f"{args.num_requests} concurrent chat requests",
        )
    write_report(args.out, "throughput", summary, rows)


if __name__ == "__main__":
    main()
