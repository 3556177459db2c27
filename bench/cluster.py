"""Multi-turn conversations over several replicas: Serve's router against prefix affinity.

N conversations of T turns, each opening with a long document (about
``--context-tokens`` tokens; ``--documents`` of them, shared round-robin, default one
per conversation), run in rounds (turn t of every conversation at once) against four
deployments on one local Ray instance, all started up front and interleaved round by
round, so that the machine's background load falls on all of them alike:

- ``single``: one replica (the hit rate every router is held to);
- ``default``: R replicas behind Ray Serve's default router (power of two choices);
- ``affinity``: R replicas behind ``PrefixAffinityRouter``;
- ``affinity+redis``: the same with a shared Redis KV tier (``kv_store``); after round
  ``--replace-after`` the replica holding the most conversations is killed and Serve
  replaces it, and the turns after that of the conversations it held are reported
  (``replaced_hit_rate``): through Redis they still hit.

Reported per deployment: prefix hit rate (cached / prompt tokens, turns 2+ and all),
TTFT p50/p99 per turn (streamed, first token), mean turn-2+ TTFT, throughput
(generated tokens and requests per second of the rounds' wall time) and per-replica
load (requests, prompt tokens). Ratios are against ``default`` and ``single`` of the
same run.

    python bench/cluster.py --replicas 2 --out bench/out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import bar_chart, write_report  # noqa: E402
from sse_client import post_events  # noqa: E402

WORDS = [
    "revenue",
    "agency",
    "fiscal",
    "program",
    "oversight",
    "audit",
    "committee",
    "report",
    "budget",
    "policy",
]
WORDS += [
    "risk",
    "analysis",
    "findings",
    "contract",
    "schedule",
    "grant",
    "region",
    "staff",
    "review",
    "plan",
]
APPS = ("single", "default", "affinity", "affinity+redis")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--documents", type=int, default=None, help="default: one each")
    parser.add_argument("--context-tokens", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-cache-tokens", type=int, default=262144, help="per replica")
    parser.add_argument("--model", default=None, help="default: the tiny random model")
    parser.add_argument("--replace-after", type=int, default=2, help="round (redis run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for cluster.json/.md/.png")
    return parser.parse_args(argv)


def _documents(count: int, tokens: int, tokenizer, seed: int) -> list[str]:
    """``count`` documents of about ``tokens`` tokens each."""
    rng = random.Random(seed)
    per_word = len(tokenizer.encode(" ".join(WORDS))) / len(WORDS)
    words = int(tokens / per_word)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def _opening(i: int, docs: list[str]) -> list[dict]:
    doc = docs[i % len(docs)]
    return [{"role": "user", "content": f"Document:\n{doc}\n\nQuestion {i}: what is it about?"}]


async def _turn(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat turn: reply, seconds to first token, usage."""
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    first, text, usage = None, "", None
    path = urlsplit(url).path + "/v1/chat/completions"  # the deployment's route prefix
    async for elapsed, chunk in post_events(url, path, json.dumps(body).encode()):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content") or choice.get("finish_reason"):
                first = first or elapsed
                text += choice["delta"].get("content") or ""
    details = usage.get("prompt_tokens_details") or {}
    return {
        "reply": text,
        "ttft": first,
        "prompt": usage["prompt_tokens"],
        "cached": details.get("cached_tokens", 0),
        "generated": usage["completion_tokens"],
    }


async def _round(url: str, convs: list[list[dict]], turn: int, max_tokens: int) -> list[dict]:
    results = await asyncio.gather(*(_turn(url, c, max_tokens) for c in convs))
    for i, (conv, result) in enumerate(zip(convs, results, strict=True)):
        result.update(conversation=i, turn=turn + 1)
        conv += [
            {"role": "assistant", "content": result["reply"]},
            {"role": "user", "content": f"Turn {turn + 2} of conversation {i}: say more."},
        ]
    return results


class Deployment:
    """One deployment under test: its handle, URL, conversations and results."""

    def __init__(self, name: str, args, model: str, replicas: int, router: str, redis):
        from prefixcache.cluster import ClusterOptions
        from prefixcache.cluster.launch import deploy

        engine = {
            "model": model,
            "device": "cpu",
            "max_model_len": args.context_tokens + 4096,
            "kv_cache_tokens": args.kv_cache_tokens,
        }
        if redis is not None:
            engine["kv_store"] = redis.url
        cluster = ClusterOptions(num_replicas=replicas, router=router, replica_cpus=1.0)
        prefix = "/" + name.split("+")[-1]
        self.handle = deploy(
            engine,
            model_name="bench",
            cluster=cluster,
            host="127.0.0.1",
            port=args.port,
            app_name=name,
            route_prefix=prefix,
        )
        self.name, self.replicas, self.redis = name, replicas, redis
        self.url = f"http://127.0.0.1:{args.port}{prefix}"
        self.convs = [_opening(i, args.docs) for i in range(args.conversations)]
        self.results: list[dict] = []
        self.wall = 0.0
        self.replaced: set[int] = set()
        self.replacement_s: float | None = None
        print(f"[{name}] {replicas} replica(s) ready", file=sys.stderr, flush=True)

    def round(self, turn: int, args) -> None:
        """Turn ``turn`` of every conversation at once (the redis deployment first
        loses its busiest replica when ``turn`` is ``--replace-after``)."""
        if self.redis is not None and turn == args.replace_after:
            victim, self.replaced = _victim(self, args.tokenizer)
            self.replacement_s = _replace(self, victim)
        start = time.perf_counter()
        self.results += asyncio.run(_round(self.url, self.convs, turn, args.max_tokens))
        self.wall += time.perf_counter() - start

    def summary(self, args) -> dict:
        """The row of this deployment."""
        loads = _replica_loads(self.handle, self.replicas)
        return _summary(self, loads, args.replace_after)


def _replica_loads(handle, replicas: int) -> list[dict]:
    """Every replica's load; without a router that takes ``replica=``, asked until each
    replica has answered (Serve's router spreads the asks)."""
    seen: dict[str, dict] = {}
    for _ in range(50 * replicas):
        load = handle.load.remote().result()
        seen[load["replica"]] = load
        if len(seen) == replicas:
            break
    return sorted(seen.values(), key=lambda x: -x["requests"])


def _victim(dep: Deployment, tokenizer) -> tuple[str, set[int]]:
    """The replica holding the most conversations, and which ones it holds."""
    from prefixcache.client import InputProcessor
    from prefixcache.cluster.registry import router_for

    handle = dep.handle
    inputs = InputProcessor(tokenizer, handle.limits.remote().result())
    replicas = router_for("EngineReplica", dep.name).replica_ids()
    held: dict[str, set[int]] = {r: set() for r in replicas}
    for i, conv in enumerate(dep.convs):
        ids = inputs.chat_tokens(conv[:-1], add_generation_prompt=False)
        for r in replicas:
            if handle.peek.remote(prompt_ids=ids, replica=r).result() > len(ids) // 2:
                held[r].add(i)
    victim = max(held, key=lambda r: len(held[r]))
    return victim, held[victim]


def _replace(dep: Deployment, victim: str) -> float:
    """Kill ``victim``'s actor; wait until Serve runs all replicas again. Seconds taken."""
    import ray

    from prefixcache.cluster.registry import router_for

    handle, replicas = dep.handle, dep.replicas
    name = handle.whoami.remote(replica=victim).result()[1]
    start = time.perf_counter()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    router = router_for("EngineReplica", dep.name)
    while True:
        ids = router.replica_ids()
        if victim not in ids and len(ids) == replicas:
            return time.perf_counter() - start
        handle.whoami.remote().result()  # keeps this process's router up to date
        time.sleep(0.2)  # polling interval while Serve starts the replacement


def _hit_rate(rows: list[dict]) -> float:
    prompt = sum(r["prompt"] for r in rows)
    return sum(r["cached"] for r in rows) / prompt if prompt else 0.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(dep: Deployment, loads: list[dict], replace_after: int) -> dict:
    name, results, wall, replaced = dep.name, dep.results, dep.wall, dep.replaced
    later = [r for r in results if r["turn"] > 1]
    row = {
        "deployment": name,
        "hit_rate_turn2plus": _hit_rate(later),
        "hit_rate_all": _hit_rate(results),
        "ttft_mean_turn2plus_s": statistics.fmean(r["ttft"] for r in later),
    }
    for turn in sorted({r["turn"] for r in results}):
        ttfts = [r["ttft"] for r in results if r["turn"] == turn]
        row[f"ttft_p50_t{turn}_s"] = _pct(ttfts, 0.5)
        row[f"ttft_p99_t{turn}_s"] = _pct(ttfts, 0.99)
    row["tokens_per_s"] = sum(r["generated"] for r in results) / wall
    row["requests_per_s"] = len(results) / wall
    row["replica_requests"] = "/".join(str(x["requests"]) for x in loads)
    row["replica_prompt_tokens"] = "/".join(str(x["prompt_tokens"]) for x in loads)
    if replaced:
        after = [r for r in results if r["conversation"] in replaced and r["turn"] > replace_after]
        row["replaced_conversations"] = len(replaced)
        row["replaced_hit_rate"] = _hit_rate(after)
        row["replacement_s"] = dep.replacement_s
    return row


def _start_redis():
    """A local ``redis-server`` (None when it is not installed)."""
    if shutil.which("redis-server") is None:
        print("redis-server not found: skipping affinity+redis", file=sys.stderr)
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from redis_server import RedisServer

    return RedisServer().start()


def _setup(args) -> str:
    from prefixcache.inputs.tokenizer import load_tokenizer
    from prefixcache.models.loader import resolve_model_path
    from prefixcache.testing import make_tiny_model

    model = args.model or str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    tokenizer = load_tokenizer(resolve_model_path(model))
    count = args.documents or args.conversations
    args.docs = _documents(count, args.context_tokens, tokenizer, args.seed)
    args.tokenizer = tokenizer
    args.port = _free_port()
    return model


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    import ray

    args = _args(argv)
    model = _setup(args)
    # Ray's CPUs are only accounting here: idle replicas take no CPU, and one
    # deployment runs at a time.
    ray.init(num_cpus=1 + 3 * args.replicas, include_dashboard=False, log_to_driver=False)
    redis = _start_redis()
    try:
        deps = [
            Deployment("single", args, model, 1, "affinity", None),
            Deployment("default", args, model, args.replicas, "default", None),
            Deployment("affinity", args, model, args.replicas, "affinity", None),
        ]
        if redis is not None:
            deps.append(Deployment("affinity+redis", args, model, args.replicas, "affinity", redis))
        for turn in range(args.turns):
            for dep in deps:
                dep.round(turn, args)
            print(f"round {turn + 1} done", file=sys.stderr, flush=True)
        rows = [dep.summary(args) for dep in deps]
    finally:
        if redis is not None:
            redis.stop()
        ray.shutdown()
    _report(args, rows)


def _report(args, rows: list[dict]) -> None:
    by = {r["deployment"]: r for r in rows}
    affinity, default, single = by["affinity"], by["default"], by["single"]
    summary = {
        "replicas": args.replicas,
        "conversations": args.conversations,
        "turns": args.turns,
        "context_tokens": args.context_tokens,
        "affinity_hit_rate_vs_single": affinity["hit_rate_turn2plus"]
        / single["hit_rate_turn2plus"],
        "default_hit_rate_vs_single": default["hit_rate_turn2plus"] / single["hit_rate_turn2plus"],
        "turn2plus_ttft_default_over_affinity": default["ttft_mean_turn2plus_s"]
        / affinity["ttft_mean_turn2plus_s"],
        "throughput_affinity_over_default": affinity["tokens_per_s"] / default["tokens_per_s"],
    }
    if "affinity+redis" in by:
        summary["replaced_hit_rate_with_redis"] = by["affinity+redis"].get("replaced_hit_rate")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        bar_chart(
            Path(args.out) / "cluster.png",
            [r["deployment"] for r in rows],
            [r["ttft_mean_turn2plus_s"] * 1000 for r in rows],
            "mean TTFT, turns 2+ (ms)",
            f"{args.conversations} conversations x {args.turns} turns, "
            f"~{args.context_tokens}-token documents, {args.replicas} replicas",
        )
    write_report(args.out, "cluster", summary, rows)


if __name__ == "__main__":
    main()
