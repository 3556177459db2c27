"""Prefix-cache counters count each request's lookup once.

A request looked up again, because it waited for room or was preempted and
re-admitted, is the same request: counting it again made the hit counter exceed the
prompt tokens ever sent (16.6 M hit tokens against 1.5 M sent).
"""

from __future__ import annotations

import random

import httpx
from server_harness import on_engine, running_server

from prefixcache import Engine, SamplingParams


def _prompts(count: int, seed: int, shared: int = 0) -> list[list[int]]:
    """``count`` prompts of 40-90 tokens, the first ``shared`` of them common to all."""
    rng = random.Random(seed)
    head = [rng.randrange(3, 700) for _ in range(shared)]
    tails = [[rng.randrange(3, 700) for _ in range(rng.randint(40, 90))] for _ in range(count)]
    return [head + tail for tail in tails]


def _run_under_pressure(engine: Engine, prompts: list[list[int]]) -> int:
    """Run ``prompts`` at once in ``engine``; returns how many preemptions they took."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    states = [engine.core.requests[i] for i in ids]
    while engine.has_unfinished_requests():
        engine.step()
    assert all(s.seq.finish_reason == "length" for s in states)
    return sum(s.seq.num_preemptions for s in states)


def test_preempted_requests_are_counted_once(tiny_llama):
    engine = Engine.from_pretrained(
        str(tiny_llama), device="cpu", kv_cache_tokens=320, max_num_batched_tokens=256
    )
    prompts = _prompts(12, seed=2)
    assert _run_under_pressure(engine, prompts) > 0, "the pool was meant to run dry"
    stats = engine.stats()
    # Each request's lookup covers all but its last prompt token.
    assert stats["query_tokens"] == sum(len(p) - 1 for p in prompts)
    assert stats["hit_tokens"] == 0  # the prompts share nothing
    engine.check_integrity()


def test_hits_through_the_host_tier_never_exceed_the_prompt_tokens(tiny_llama):
    engine = Engine.from_pretrained(
        str(tiny_llama),
        device="cpu",
        kv_cache_tokens=320,
        max_num_batched_tokens=256,
        host_cache_tokens=4096,
    )
    prompts = _prompts(12, seed=3, shared=32)
    head = prompts[0][:33]
    engine.prewarm(head)  # the shared head is cached before the batch looks it up
    assert _run_under_pressure(engine, prompts) > 0, "the pool was meant to run dry"
    snapshot = engine.snapshot()
    sent = len(head) + sum(len(p) for p in prompts)
    served = sum(tier.hit_tokens for tier in snapshot.tiers)
    assert 0 < served <= sent
    assert snapshot.query_tokens == len(head) - 1 + sum(len(p) - 1 for p in prompts)
    engine.check_integrity()


def test_a_pin_is_not_counted_as_a_lookup(tiny_llama):
    engine = Engine.from_pretrained(str(tiny_llama), device="cpu", kv_cache_tokens=2048)
    prompt = _prompts(1, seed=4)[0]
    engine.prewarm(prompt, pin=True)
    stats = engine.stats()
    assert stats["query_tokens"] == len(prompt) - 1  # the prewarm request's own lookup
    assert stats["hit_tokens"] == 0


def test_metrics_hit_tokens_stay_within_the_prompt_tokens_sent(tiny_llama):
    options = {"kv_cache_tokens": 320, "max_num_batched_tokens": 256}
    with running_server(str(tiny_llama), engine_options=options) as server:
        prompts = _prompts(6, seed=5, shared=32)
        # Requests sent one by one would never preempt each other: queue them together
        # on the engine's own thread, then one more over HTTP.
        preemptions = on_engine(server.client, lambda e: _run_under_pressure(e, prompts))
        assert preemptions > 0, "the pool was meant to run dry"
        with httpx.Client(trust_env=False, timeout=60) as http:
            body = {"model": "tiny", "prompt": prompts[0], "max_tokens": 2}
            assert http.post(server.api_url + "/completions", json=body).status_code == 200
        sent = sum(len(p) for p in prompts) + len(prompts[0])
        hits = server.metric("prefixcache_prefix_cache_hit_tokens_total", tier="device")
        queried = server.metric("prefixcache_prefix_cache_queried_tokens_total")
        assert hits is not None and 0 < hits <= queried < sent


def test_a_request_onloaded_from_the_host_tier_twice_counts_its_hits_once(tiny_llama):
    engine = Engine.from_pretrained(
        str(tiny_llama), device="cpu", kv_cache_tokens=1024, host_cache_tokens=4096
    )
    prompt = _prompts(1, seed=6)[0]
    engine.prewarm(prompt)
    blocks = engine.core.blocks
    blocks.cache.evict(blocks.cache.num_evictable_blocks)  # down to the host tier
    rid = engine.add_request(prompt + [5, 6], SamplingParams(max_tokens=1))
    seq = engine.core.requests[rid].seq
    for _ in range(2):  # a lookup, then another after the request lost its blocks
        blocks.match_prefix(seq)
        assert seq.num_computed_tokens == len(prompt) // 16 * 16  # onloaded from the host
        blocks.free(seq, cache_blocks=False)
        seq.num_computed_tokens = 0
        blocks.cache.evict(blocks.cache.num_evictable_blocks)
    while engine.has_unfinished_requests():
        engine.step()
    host = engine.snapshot().tiers[1]
    assert host.name == "host" and host.hit_tokens == len(prompt) // 16 * 16  # once
    engine.check_integrity()
