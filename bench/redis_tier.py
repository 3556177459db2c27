"""A prefix computed by one engine, reused by another through the Redis KV tier.

Two engines stand for two replicas (or two ``prefixcache serve`` processes on two
machines). Engine A serves a long prefix once; its chunks are written behind the
request into Redis. Engine B, which never saw the prefix, then answers
``prefix + question`` (a few new tokens, one generated token: the time to first token)
in three states:

* ``recompute``: B without the Redis tier prefills the whole prompt (the replica that
  has not seen the conversation, today);
* ``redis``: B with the Redis tier reads the prefix's chunks from Redis, verifies them
  and onloads them;
* ``device``: A itself, the prefix still in its device cache (for reference).

B's device cache is emptied before each timed request, so every ``redis`` request
reads from Redis. Each timing is the median of ``--repeats`` runs; ``speedup`` is
against ``recompute`` in the same run. Starts its own ``redis-server`` on a free port
(``--redis-url`` uses a running one instead: it must be empty of other data you mind
losing, since keys of the model are written there).

    python bench/redis_tier.py [--tokens 8000 32000] [--repeats 3] [--out bench/out]

Prints a markdown table, writes ``redis_tier.json``/``.md``/``.png`` under ``--out``,
and prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import socket
import statistics
import subprocess
import sys
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


@contextlib.contextmanager
def _redis(url: str | None):
    """``url``, or a fresh ``redis-server`` on a free port (stopped after)."""
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed; pass --redis-url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(500):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.02)  # polling interval while it starts
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _engine(args, kv_tokens: int, **options) -> Engine:
    return Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, kv_cache_tokens=kv_tokens, **options
    )


def _empty_device(engine: Engine) -> None:
    cache = engine.core.blocks.cache
    cache.evict(cache.num_evictable_blocks)


def _time(engine: Engine, prefix, questions, reset) -> tuple[float, int]:
    """Median seconds of ``prefix + question`` after ``reset(engine)``; cached tokens."""
    times, cached = [], 0
    for question in questions:
        reset(engine)
        start = time.perf_counter()
        out = engine.generate(prefix + question, PARAMS)[0]
        times.append(time.perf_counter() - start)
        cached = out.num_cached_tokens
    return statistics.median(times), cached


def bench_one(args, num_tokens: int, url: str) -> list[dict]:
    """Rows for one prefix length: one per state."""
    rng = random.Random(num_tokens)
    vocab = min(ModelConfig.from_folder(Path(args.model)).vocab_size, 32000)
    prefix = _tokens(rng, num_tokens, vocab)
    questions = [_tokens(rng, QUESTION_TOKENS, vocab) for _ in range(args.repeats + 1)]
    kv_tokens = num_tokens + 4 * CHUNK_SIZE
    a = _engine(args, kv_tokens, kv_store=url)
    a.generate(prefix + questions[0], PARAMS)
    start = time.perf_counter()
    a.core.blocks.tiers.tier("redis").drain()  # A's writes land behind its request
    drained = time.perf_counter() - start
    states = {
        "recompute": (_engine(args, kv_tokens), _empty_device),
        "redis": (_engine(args, kv_tokens, kv_store=url), _empty_device),
        "device": (a, lambda e: None),
    }
    rows = []
    for name, (engine, reset) in states.items():
        seconds, cached = _time(engine, prefix, questions[1:], reset)
        stats = engine.stats()
        row = {"tokens": num_tokens, "state": name, "seconds": seconds, "cached_tokens": cached}
        row["redis_MiB_per_request"] = stats.get("redis_read_bytes", 0) / args.repeats / 2**20
        row["a_writes_drained_s"] = drained  # A's queue emptied this long after its reply
        rows.append(row)
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = base / row["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8_000, 32_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--redis-url", default=None, help="a running Redis (default: start one)")
    parser.add_argument("--out", default=None, help="folder for redis_tier.json/.md/.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model = args.model or str(default_model_path())
    rows = []
    with _redis(args.redis_url) as url:
        for n in args.tokens:
            rows += bench_one(args, n, url)
    summary = {"bench": "redis_tier", "device": args.device, "threads": args.threads}
    for row in rows:
        key = f"{row['state']}_{row['tokens'] // 1000}k"
        summary[f"{key}_s"] = round(row["seconds"], 4)
        if row["state"] != "recompute":
            summary[f"{key}_speedup"] = round(row["speedup"], 2)
    if args.out:
        labels = [f"{r['state']} {r['tokens'] // 1000}k" for r in rows]
        chart = Path(args.out) / "redis_tier.png"
        chart.parent.mkdir(parents=True, exist_ok=True)
        title = "Turn on a replica that never saw the prefix"
        bar_chart(chart, labels, [r["seconds"] for r in rows], "seconds", title)
    write_report(args.out, "redis_tier", summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
