"""Many concurrent multi-turn conversations over HTTP: throughput, TTFT and inter-token latency.

The load of issue 22: every conversation shares one system prompt (``--system-tokens``,
2,000 by default), has a context of its own (``--context-tokens``, 1,500) in its first
user message, and asks ``--turns`` questions of ``--question-tokens`` (64) one after
another, each answered by ``--max-tokens`` (28) streamed tokens (``ignore_eos``, greedy).
Each turn appends the previous answer and the next question to the conversation.

At each level of concurrency (``--streams``, 1 4 16 32 by default) that many streams
run at once, each one conversation after another, turn after turn; a level ends after
``--requests-per-stream`` requests per stream (at least ``--min-requests`` in all), or
when ``--level-seconds`` have passed (no turn starts after that). Every level uses
conversations of its own, so only the system prompt is shared between levels.

Reported per level: requests/s and output tokens/s, time to first token p50/p99 and
the inter-token latency p50/p99 (gaps between a stream's successive text events).
The server is started here (``prefixcache serve``) unless ``--url`` names one;
``--server-arg`` passes options through (e.g. ``--server-arg=--step-time-target-ms=0``
for the fixed step budget); ``--compare-fixed`` starts a second server with the fixed
budget and runs each level on both, one after the other, so that the two see the
same machine (ratios taken within one run).

    python bench/concurrency.py --model-shape qwen2-20m --compare-fixed --out bench/out
    python bench/concurrency.py --streams 1 16 --label fixed --server-arg=--step-time-target-ms=0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report  # noqa: E402
from server_process import served_model, started_server  # noqa: E402
from sse_client import post_events  # noqa: E402

WORDS = [
    *("cache", "prefix", "token", "block", "radix", "tree", "turn", "reply", "model"),
    *("serve", "chunk", "hash", "long", "river", "mountain", "ledger", "harbor", "signal"),
    *("orchard", "lantern", "copper", "meadow", "thunder", "velvet", "quarry"),
]

# The 20M-parameter Qwen2 shape of issue 22 (random weights; bench/kv_quant_quality.py's).
# It keeps the tiny tokenizer's vocabulary, so every sampled id decodes to text.
QWEN2_20M = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 40960,
}


def exact_text(tokenizer, rng: random.Random, tokens: int) -> str:
    """Text of about ``tokens`` tokens (exactly, before the chat template's joins)."""
    words = " ".join(rng.choice(WORDS) for _ in range(tokens))
    ids = tokenizer.encode(words, add_special_tokens=False)
    while len(ids) < tokens:
        ids += ids
    return tokenizer.decode(ids[:tokens])


class Load:
    """The texts of the load: one system prompt, then contexts and questions by index."""

    def __init__(self, tokenizer, args: argparse.Namespace) -> None:
        self.tokenizer, self.args = tokenizer, args
        self.system = exact_text(tokenizer, random.Random(-1), args.system_tokens)

    def context(self, conversation: int) -> str:
        """The first user message's context of ``conversation``."""
        return exact_text(self.tokenizer, random.Random(conversation), self.args.context_tokens)

    def question(self, conversation: int, turn: int) -> str:
        """Question ``turn`` of ``conversation``."""
        rng = random.Random(conversation * 1000 + turn)
        return exact_text(self.tokenizer, rng, self.args.question_tokens)


class Record:
    """What one request measured: time to first token, the gaps, tokens out."""

    __slots__ = ("ttft", "gaps", "tokens")

    def __init__(self, ttft: float, gaps: list[float], tokens: int) -> None:
        self.ttft, self.gaps, self.tokens = ttft, gaps, tokens


async def turn(url: str, model: str, messages: list[dict], max_tokens: int):
    """One streamed chat completion: (reply text, Record)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times, text, tokens, finished = [], "", 0, None
    async for elapsed, chunk in post_events(url, "/v1/chat/completions", json.dumps(body).encode()):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content"):
                times.append(elapsed)
                text += choice["delta"]["content"]
            finished = finished or (choice.get("finish_reason") and elapsed)
    if finished is None:
        raise RuntimeError("a streamed reply ended without a finish reason")
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return text, Record(times[0] if times else finished, gaps, tokens)


async def run_level(
    url: str, model: str, load: Load, streams: int, first: int, budget: int | None = None
) -> dict:
    """``streams`` concurrent streams of conversations numbered from ``first``, for
    ``budget`` requests (by default the level's share of ``--requests-per-stream``)."""
    args = load.args
    budget = budget or max(args.min_requests, args.requests_per_stream * streams)
    deadline = time.perf_counter() + args.level_seconds
    records: list[Record] = []
    counter = iter(range(first, first + budget))  # conversation numbers, shared

    async def stream() -> None:
        while len(records) < budget and time.perf_counter() < deadline:
            conversation = next(counter, None)
            if conversation is None:
                return
            messages = [{"role": "system", "content": load.system}]
            for t in range(args.turns):
                if len(records) >= budget or time.perf_counter() >= deadline:
                    return
                user = load.question(conversation, t)
                if t == 0:
                    user = load.context(conversation) + "\n\n" + user
                messages.append({"role": "user", "content": user})
                reply, record = await turn(url, model, messages, args.max_tokens)
                messages.append({"role": "assistant", "content": reply})
                records.append(record)

    start = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(streams)))
    return summarize(streams, records, time.perf_counter() - start)


def summarize(streams: int, records: list[Record], seconds: float) -> dict:
    """One level's row."""
    ttfts = [r.ttft for r in records]
    gaps = [g for r in records for g in r.gaps]
    tokens = sum(r.tokens for r in records)
    return {
        "streams": streams,
        "requests": len(records),
        "seconds": round(seconds, 2),
        "requests_per_s": len(records) / seconds,
        "output_tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(gaps, 50),
        "itl_p99_ms": 1000 * percentile(gaps, 99),
    }


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def goals(rows: list[dict]) -> dict:
    """Issue 22's goals where the levels were measured: throughput at 16 streams at
    least that at 4, inter-token latency p50 at 16 at most 3x that at 1."""
    by = {row["streams"]: row for row in rows}
    out = {}
    if 4 in by and 16 in by:
        ratio = by[16]["requests_per_s"] / by[4]["requests_per_s"]
        out.update(throughput_16_over_4=ratio, goal_throughput_16_ge_4=ratio >= 1.0)
    if 1 in by and 16 in by:
        ratio = by[16]["itl_p50_ms"] / by[1]["itl_p50_ms"]
        out.update(itl_p50_16_over_1=ratio, goal_itl_16_le_3x_1=ratio <= 3.0)
    return out


def _model_folder(args: argparse.Namespace) -> str | None:
    """The model to serve: ``--model``, a ``--model-shape`` built here, or None (the
    embedded default)."""
    if args.model:
        return args.model
    if args.model_shape == "qwen2-20m":
        from prefixcache.testing import make_tiny_model

        folder = Path(tempfile.gettempdir()) / "prefixcache-bench-qwen2-20m"
        return str(make_tiny_model(folder, "qwen2", **QWEN2_20M))
    return None


def _tokenizer(folder: str | None):
    from prefixcache.inputs.tokenizer import load_tokenizer
    from prefixcache.testing import default_model_path

    return load_tokenizer(Path(folder) if folder else default_model_path())


def main(argv: list[str] | None = None) -> dict:
    """Run every level against the server (or, with ``--compare-fixed``, against it and
    a fixed-budget server, level by level); print the table and the JSON summary."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.url and args.compare_fixed:
        parser.error("--compare-fixed starts both servers here; it cannot use --url")
    folder = _model_folder(args)
    load = Load(_tokenizer(folder), args)
    sides = [(args.label, args.server_arg)]
    if args.compare_fixed:
        sides.append(("fixed", [*args.server_arg, "--step-time-target-ms=0"]))
    with ExitStack() as stack:
        urls = [
            stack.enter_context(started_server(folder, args.url, extra, args.server_threads))
            for _, extra in sides
        ]
        rows = _measure(load, [label for label, _ in sides], urls)
    summary = {"benchmark": "concurrency", "label": args.label, "model": args.model_shape}
    summary.update(model_path=folder, turns=args.turns, max_tokens=args.max_tokens)
    for label, _ in sides:
        mine = [r for r in rows if r["label"] == label]
        summary.update(
            {f"{label}_requests_per_s_{r['streams']}": r["requests_per_s"] for r in mine}
        )
        summary.update({f"{label}_itl_p50_ms_{r['streams']}": r["itl_p50_ms"] for r in mine})
        summary.update({f"{label}_{key}": value for key, value in goals(mine).items()})
    write_report(args.out, f"concurrency_{args.label}", summary, rows)
    return summary


def _measure(load: Load, labels: list[str], urls: list[str]) -> list[dict]:
    """Each level on each server in turn (so both see the machine's load of the moment)."""
    models = [served_model(url) for url in urls]
    for url, model in zip(urls, models, strict=True):
        # Warm-up: the shared system prompt enters the cache, the first steps are paid.
        asyncio.run(run_level(url, model, load, 1, first=10**6, budget=2))
    rows = []
    for level, streams in enumerate(load.args.streams):
        for label, url, model in zip(labels, urls, models, strict=True):
            row = asyncio.run(run_level(url, model, load, streams, first=level * 10**4))
            rows.append({"label": label, **row})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub id to serve")
    parser.add_argument(
        "--model-shape",
        choices=("default", "qwen2-20m"),
        default="default",
        help="without --model: the embedded tiny model, or the 20M Qwen2 shape built here",
    )
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    parser.add_argument("--server-arg", action="append", default=[], help="passed to serve")
    parser.add_argument(
        "--compare-fixed",
        action="store_true",
        help="also serve with --step-time-target-ms=0 (the fixed budget), level by level",
    )
    parser.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=28)
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation")
    parser.add_argument("--requests-per-stream", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=12)
    parser.add_argument("--level-seconds", type=float, default=120.0)
    parser.add_argument("--label", default="run", help="names the rows and the output files")
    parser.add_argument("--out", default=None, help="folder for the JSON and markdown")
    return parser


if __name__ == "__main__":
    main()
