"""Prefix-cache lookup latency for long prompts.

Caches a prompt of N tokens, then times ``RadixCache.match`` (unlocking after each)
on the same prompt plus a few new tokens, the shape of a follow-up turn:

* ``p50_us`` / ``p99_us``: hashing the query's chunks from scratch (as a lookup that
  also keys the host/disk tiers must) plus the tree walk;
* ``walk_p50_us`` / ``walk_p99_us``: the tree walk alone (``match`` needs no hashes);
* ``list_p50_us``: the walk when the query is a Python list, which is converted to an
  int32 array first.

    python bench/lookup.py [--tokens N] [--iters K] [--json] [--out FILE]

Prints a markdown table (unless ``--json``), writes JSON to ``--out``, and prints a
one-line JSON summary last (for the largest N).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import bar_chart  # noqa: E402

from chunking import chunk_hashes, root_seed  # noqa: E402
from prefixcache.cache.block_pool import BlockPool  # noqa: E402
from prefixcache.cache.radix_cache import RadixCache  # noqa: E402

DEFAULT_TOKENS = (1_000, 10_000, 100_000, 200_000)
BLOCK_SIZE, CHUNK_SIZE, NEW_TOKENS, VOCAB = 16, 256, 7, 32_000


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


def _time(step: Callable[[], object], cache: RadixCache, iters: int) -> tuple[float, float]:
    """p50 and p99 in microseconds of ``step()`` (a match); unlocks untimed after each."""
    for _ in range(min(iters, 20)):  # warm up
        cache.unlock(step().node)
    gc.collect()
    gc.disable()  # as timeit does: a collection pass is not part of a lookup
    samples = []
    try:
        for _ in range(iters):
            start = time.perf_counter_ns()
            result = step()
            samples.append(time.perf_counter_ns() - start)
            cache.unlock(result.node)
            del result  # free the block list outside the timed region
    finally:
        gc.enable()
    return _percentiles(samples)


def bench_one(num_tokens: int, iters: int, seed: int = 0) -> dict:
    """Cache ``num_tokens`` tokens (whole blocks) and time lookups of a follow-up prompt."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB, num_tokens, dtype=np.int32)
    num_blocks = num_tokens // BLOCK_SIZE
    pool = BlockPool(num_blocks + 8)
    cache = RadixCache(pool, BLOCK_SIZE, CHUNK_SIZE, fingerprint="bench")
    cache.insert(prompt[: num_blocks * BLOCK_SIZE], pool.allocate(num_blocks))
    query = np.concatenate([prompt, rng.integers(0, VOCAB, NEW_TOKENS, dtype=np.int32)])
    query_list = query.tolist()
    seed_hash = root_seed("bench")

    def hashed_match():
        chunk_hashes(query, CHUNK_SIZE, seed_hash)
        return cache.match(query)

    hit = cache.match(query)
    cache.unlock(hit.node)
    assert hit.num_tokens == num_blocks * BLOCK_SIZE, "benchmark prompt was not fully matched"
    p50, p99 = _time(hashed_match, cache, iters)
    walk_p50, walk_p99 = _time(lambda: cache.match(query), cache, iters)
    list_p50, _ = _time(lambda: cache.match(query_list), cache, max(iters // 4, 20))
    cache.check_integrity()
    return {
        "tokens": num_tokens,
        "hit_tokens": hit.num_tokens,
        "p50_us": round(p50, 1),
        "p99_us": round(p99, 1),
        "walk_p50_us": round(walk_p50, 1),
        "walk_p99_us": round(walk_p99, 1),
        "list_p50_us": round(list_p50, 1),
    }


def _table(results: list[dict]) -> str:
    lines = [
        "| tokens | hit tokens | p50 µs | p99 µs | walk p50 µs | walk p99 µs | list p50 µs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cells = [r["tokens"], r["hit_tokens"], r["p50_us"], r["p99_us"]]
        cells += [r["walk_p50_us"], r["walk_p99_us"], r["list_p50_us"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _write(folder: Path, config: dict, results: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = {"config": config, "results": results}
    (folder / "lookup.json").write_text(json.dumps(body, indent=2) + "\n")
    (folder / "lookup.md").write_text(_table(results) + "\n")
    labels = [f"{r['tokens']:,}" for r in results]
    p99 = [r["p99_us"] for r in results]
    bar_chart(folder / "lookup.png", labels, p99, "p99 lookup µs (with hashing)", "lookup")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return the summary that was printed last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, action="append", help="prompt length (repeatable)")
    parser.add_argument("--iters", type=int, default=400, help="timed lookups per measurement")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--out", type=Path, help="folder for lookup.json, .md and .png")
    args = parser.parse_args(argv)
    sizes = args.tokens or list(DEFAULT_TOKENS)
    if any(n < BLOCK_SIZE for n in sizes) or args.iters < 1:
        parser.error(f"--tokens must be >= {BLOCK_SIZE} and --iters >= 1")
    results = [bench_one(n, args.iters) for n in sizes]
    config = {"block_size": BLOCK_SIZE, "chunk_size": CHUNK_SIZE, "iters": args.iters}
    if not args.json:
        print(_table(results))
    if args.out:
        _write(args.out, config, results)
    summary = max(results, key=lambda r: r["tokens"])
    print(json.dumps({**summary, **config}))
    return summary


if __name__ == "__main__":
    main()
