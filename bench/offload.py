"""Reusing a long prefix from the host or disk tier versus recomputing it.

For each prefix length N, times one request ``prefix + question`` (a few new tokens,
one generated token: the time to first token) in four states:

* ``recompute``: prefix caching off, the whole prompt is prefilled;
* ``device``: the prefix is still in the device cache (for reference);
* ``host``: the prefix was evicted from the device to the host tier and is onloaded;
* ``disk``: the prefix is only in the disk tier (no host tier), read back and onloaded.
  Files are read through the OS page cache, so this is the cost of verifying and
  copying them, not of a cold disk.

Every state is reset before each timed request (the device cache is emptied by
evicting, which offloads), and each timing is the median of ``--repeats`` runs.

    python bench/offload.py [--tokens 10000 50000] [--repeats 3] [--out bench/out]
    python bench/offload.py --kv-cache-dtype int8   # also at auto: the ratios' baseline

Prints a markdown table, writes ``offload.json``/``offload.md`` under ``--out``, and
prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from report import bar_chart, write_report  # noqa: E402

from prefixcache import Engine, SamplingParams  # noqa: E402
from prefixcache.models.config import ModelConfig  # noqa: E402
from prefixcache.testing import default_model_path  # noqa: E402

CHUNK_SIZE = 256
QUESTION_TOKENS = 8
PARAMS = SamplingParams(max_tokens=1, ignore_eos=True)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _engine(args, kv_tokens: int, kv_cache_dtype: str = "auto", **tiers) -> Engine:
    return Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, kv_cache_tokens=kv_tokens,
        kv_cache_dtype=kv_cache_dtype, **tiers,
    )  # fmt: skip


def _empty_device(engine: Engine) -> None:
    """Evict every cached device block (offloading it when there is a host tier)."""
    cache = engine.core.blocks.cache
    cache.evict(cache.num_evictable_blocks)


def _time_state(engine: Engine, prefix, questions, reset) -> tuple[float, int]:
    """Median seconds of ``prefix + question`` after ``reset(engine)``; cached tokens."""
    times, cached = [], 0
    for question in questions:
        reset(engine)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prefix + question, PARAMS)[0]
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cached = out.num_cached_tokens
    return statistics.median(times), cached


def bench_one(args, num_tokens: int, folder: Path, kv_dtype: str = "auto") -> list[dict]:
    """Rows for one prefix length and KV dtype: one per state."""
    rng = random.Random(num_tokens)
    vocab = min(ModelConfig.from_folder(Path(args.model)).vocab_size, 32000)
    prefix = _tokens(rng, num_tokens, vocab)
    questions = [_tokens(rng, QUESTION_TOKENS, vocab) for _ in range(args.repeats + 1)]
    warm, timed = questions[0], questions[1:]
    kv_tokens = num_tokens + 4 * CHUNK_SIZE
    host_tokens = -(-kv_tokens // CHUNK_SIZE) * CHUNK_SIZE
    make = partial(_engine, args, kv_tokens, kv_dtype)
    states = {
        "recompute": (make(enable_prefix_caching=False), lambda e: None),
        "device": (make(), lambda e: None),
        "host": (make(host_cache_tokens=host_tokens), _empty_device),
        "disk": (make(disk_cache_dir=str(folder / kv_dtype)), _empty_device),
    }
    rows = []
    for name, (engine, reset) in states.items():
        engine.generate(prefix + warm, PARAMS)  # fills the cache (and the tiers)
        seconds, cached = _time_state(engine, prefix, timed, reset)
        stats = engine.stats()
        moved = stats.get("onloaded_bytes", 0) // max(len(timed), 1)
        row = {"tokens": num_tokens, "kv_cache_dtype": kv_dtype, "source": name}
        row |= {"seconds": seconds, "kv_bytes_per_token": stats["kv_bytes_per_token"]}
        rows.append(row | {"cached_tokens": cached, "onloaded_MiB_per_request": moved / 2**20})
        del engine
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = base / row["seconds"]
    return rows


def _summary(rows: list[dict], kv_dtype: str) -> dict:
    """Seconds per state, speedups over recomputing, and for a quantized KV dtype its
    KV bytes, onloaded bytes and reuse times against the same state at auto."""
    summary, by_key = {}, {}
    for row in rows:
        suffix = "" if row["kv_cache_dtype"] == "auto" else f"_{row['kv_cache_dtype']}"
        key = f"{row['source']}_{row['tokens'] // 1000}k{suffix}"
        by_key[key] = row
        summary[f"{key}_s"] = round(row["seconds"], 4)
        if row["source"] != "recompute":
            summary[f"{key}_speedup"] = round(row["speedup"], 2)
    if kv_dtype != "auto":
        first = rows[0]["kv_bytes_per_token"]
        quantized = next(r for r in rows if r["kv_cache_dtype"] == kv_dtype)
        summary["kv_bytes_per_token"] = {"auto": first, kv_dtype: quantized["kv_bytes_per_token"]}
        summary["kv_bytes_ratio_vs_auto"] = round(first / quantized["kv_bytes_per_token"], 2)
        for key, row in by_key.items():
            base = by_key.get(key.removesuffix(f"_{kv_dtype}"))
            if key.endswith(kv_dtype) and row["source"] in ("host", "disk"):
                summary[f"{key}_time_vs_auto"] = round(row["seconds"] / base["seconds"], 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8", "fp8"],
        default="auto",
        help="int8/fp8: every state also runs at auto, the baseline its ratios are against",
    )
    parser.add_argument("--out", default=None, help="folder for offload.json/.md/.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model = args.model or str(default_model_path())
    rows = []
    kv_dtypes = ["auto"] if args.kv_cache_dtype == "auto" else ["auto", args.kv_cache_dtype]
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as scratch:
        for n in args.tokens:
            for kv_dtype in kv_dtypes:
                rows += bench_one(args, n, Path(scratch) / str(n), kv_dtype)
    summary = {"bench": "offload", "device": args.device, "threads": args.threads}
    summary.update(_summary(rows, args.kv_cache_dtype))
    if args.out:
        labels = [f"{r['source']} {r['tokens'] // 1000}k {r['kv_cache_dtype']}" for r in rows]
        chart = Path(args.out) / "offload.png"
        chart.parent.mkdir(parents=True, exist_ok=True)
        bar_chart(chart, labels, [r["seconds"] for r in rows], "seconds", "Prefix reuse by tier")
    write_report(args.out, "offload", summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
