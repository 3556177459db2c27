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


def _engine(args, kv_tokens: int, **tiers) -> Engine:
    return Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, kv_cache_tokens=kv_tokens, **tiers
    )


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


def bench_one(args, num_tokens: int, folder: Path) -> list[dict]:
    """Rows for one prefix length: one per state."""
    rng = random.Random(num_tokens)
    vocab = min(ModelConfig.from_folder(Path(args.model)).vocab_size, 32000)
    prefix = _tokens(rng, num_tokens, vocab)
    questions = [_tokens(rng, QUESTION_TOKENS, vocab) for _ in range(args.repeats + 1)]
    warm, timed = questions[0], questions[1:]
    kv_tokens = num_tokens + 4 * CHUNK_SIZE
    host_tokens = -(-kv_tokens // CHUNK_SIZE) * CHUNK_SIZE
    states = {
        "recompute": (_engine(args, kv_tokens, enable_prefix_caching=False), lambda e: None),
        "device": (_engine(args, kv_tokens), lambda e: None),
        "host": (_engine(args, kv_tokens, host_cache_tokens=host_tokens), _empty_device),
        "disk": (_engine(args, kv_tokens, disk_cache_dir=str(folder)), _empty_device),
    }
    rows = []
    for name, (engine, reset) in states.items():
        engine.generate(prefix + warm, PARAMS)  # fills the cache (and the tiers)
        seconds, cached = _time_state(engine, prefix, timed, reset)
        stats = engine.stats()
        moved = stats.get("onloaded_bytes", 0) // max(len(timed), 1)
        row = {"tokens": num_tokens, "source": name, "seconds": seconds}
        rows.append(row | {"cached_tokens": cached, "onloaded_MiB_per_request": moved / 2**20})
        del engine
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = base / row["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for offload.json/.md/.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model = args.model or str(default_model_path())
    rows = []
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as scratch:
        for n in args.tokens:
            rows += bench_one(args, n, Path(scratch) / str(n))
    summary = {"bench": "offload", "device": args.device, "threads": args.threads}
    for row in rows:
        key = f"{row['source']}_{row['tokens'] // 1000}k"
        summary[f"{key}_s"] = round(row["seconds"], 4)
        if row["source"] != "recompute":
            summary[f"{key}_speedup"] = round(row["speedup"], 2)
    if args.out:
        labels = [f"{r['source']} {r['tokens'] // 1000}k" for r in rows]
        chart = Path(args.out) / "offload.png"
        chart.parent.mkdir(parents=True, exist_ok=True)
        bar_chart(chart, labels, [r["seconds"] for r in rows], "seconds", "Prefix reuse by tier")
    write_report(args.out, "offload", summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
