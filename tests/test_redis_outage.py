"""A Redis KV store that dies never fails a request: its tier turns itself off, counts
the failure, and comes back once the server does. Real redis-server, real engine."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from engine_hooks import forward_gate
from redis_server import RedisServer, free_port, require_redis
from server_harness import on_engine, running_server

from prefixcache import Engine
from prefixcache.tiers.redis_link import RedisLink, connect

CHUNK = 64
FAILURES = "prefixcache_tier_failures_total"


class FakeClock:
    """A monotonic clock the test moves by hand, so back-offs pass without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


@pytest.fixture
def store():
    require_redis()
    server = RedisServer().start()
    yield server
    server.stop()


def test_redis_killed_mid_load_requests_succeed_and_the_tier_comes_back(tiny_llama, store):
    clock = FakeClock()
    options = dict(dtype="float32", chunk_size=CHUNK, kv_cache_tokens=4096, kv_store=store.url)
    with (
        running_server(str(tiny_llama), engine_options=options) as served,
        httpx.Client(trust_env=False, timeout=60) as http,
    ):
        on_engine(served.client, lambda e: setattr(_tier(e).link, "clock", clock))

        def complete(prompt: list[int]) -> httpx.Response:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
            return http.post(served.url + "/v1/completions", json=body)

        with forward_gate(served.client) as gate, ThreadPoolExecutor(4) as pool:
            replies = [pool.submit(complete, _prompt(i, 3 * CHUNK)) for i in range(4)]
            gate.wait_until_held()  # requests are in the engine: now Redis dies
            store.stop()
            gate.open()
            replies = [r.result() for r in replies]
        replies += [complete(_prompt(10 + i, 2 * CHUNK)) for i in range(2)]
        assert [r.status_code for r in replies] == [200] * 6
        failed = served.metric(FAILURES, tier="redis")
        assert failed >= 1
        # Off until its back-off passes: later requests do not even try Redis.
        assert complete(_prompt(20, 2 * CHUNK)).status_code == 200
        assert served.metric(FAILURES, tier="redis") == failed

        store.start()  # back on the same port, empty as after a crash
        clock.now += 3600
        prompt = _prompt(30, 3 * CHUNK)
        assert complete(prompt).status_code == 200
        on_engine(served.client, lambda e: _tier(e).drain())
        assert served.metric(FAILURES, tier="redis") == failed
        assert store.client().dbsize() > 0  # writes go to Redis again
    # And what was written there serves another engine.
    other = Engine.from_pretrained(str(tiny_llama), device="cpu", **options)
    assert other.generate(prompt)[0].num_cached_tokens == len(prompt) - 16


def test_a_failed_link_waits_out_its_back_off_then_doubles_it_while_redis_stays_away():
    require_redis()
    port, clock = free_port(), FakeClock()
    url = f"redis://127.0.0.1:{port}/0"
    link = RedisLink(connect(url), url, retry_after_s=1.0, max_retry_after_s=4.0, clock=clock)
    assert link.call(lambda c: c.ping(), default="miss") == "miss"  # nothing listens
    assert (link.failures, link.is_up) == (1, False)
    assert link.call(lambda c: c.ping(), default="miss") == "miss"
    assert (link.failures, link.skipped) == (1, 1)  # skipped, the network untouched
    clock.now += 1.0
    link.call(lambda c: c.ping())
    assert link.failures == 2  # tried again, failed: now off for 2s
    clock.now += 1.5
    link.call(lambda c: c.ping())
    assert link.failures == 2
    server = RedisServer(port).start()
    try:
        clock.now += 0.5
        assert link.call(lambda c: c.ping()) is True
        assert link.is_up and link.outages == 1
    finally:
        server.stop()


def _tier(engine: Engine):
    return engine.core.blocks.tiers.tier("redis")
