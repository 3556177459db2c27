"""Pre-warming, pinning with a TTL, and flushing the prefix cache from the SDK."""

from __future__ import annotations

import pytest

from prefixcache import Engine, SamplingParams

BLOCK = 16


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 1024)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 600 + 3 for i in range(n)]


def test_prewarm_caches_a_prompt_without_a_reply(tiny_llama):
    engine = _engine(tiny_llama)
    handle = engine.prewarm(_prompt(1, 100))
    assert handle.num_tokens == 100 and handle.num_cached_tokens == 96 and not handle.pinned
    out = engine.generate(_prompt(1, 100) + [5, 6], SamplingParams(max_tokens=2))[0]
    assert out.num_cached_tokens == 96
    engine.check_integrity()


def test_prewarmed_messages_prefix_a_later_conversation(tiny_llama):
    engine = _engine(tiny_llama)
    system = [{"role": "system", "content": "You answer from the documents. " * 10}]
    handle = engine.prewarm(system)
    out = engine.chat(system + [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2))
    assert out[0].num_cached_tokens >= handle.num_tokens // BLOCK * BLOCK


def test_pinned_prefix_survives_eviction_pressure_until_unpinned(tiny_llama):
    engine = _engine(tiny_llama, kv_cache_tokens=512, max_pinned_tokens=256)
    pinned = _prompt(2, 160)
    handle = engine.prewarm(pinned, pin=True)
    assert handle.pinned and handle.num_cached_tokens == 160
    for seed in range(3, 12):  # each fills most of the pool
        engine.generate(_prompt(seed, 300), SamplingParams(max_tokens=2))
    assert engine.core.blocks.cache.peek(pinned) == 160
    assert engine.unpin(handle) and not engine.unpin(handle)
    engine.generate(_prompt(20, 400), SamplingParams(max_tokens=2))
    assert engine.core.blocks.cache.peek(pinned) < 160
    engine.check_integrity()


def test_pin_over_the_cap_is_refused_before_any_work(tiny_llama):
    engine = _engine(tiny_llama, max_pinned_tokens=100)
    engine.prewarm(_prompt(1, 64), pin=True)
    before = engine.stats()
    with pytest.raises(ValueError, match="pinned-token cap"):
        engine.prewarm(_prompt(2, 64), pin=True)
    assert engine.stats() == before


def test_ttl_expiry_unpins(tiny_llama):
    engine = _engine(tiny_llama)
    now = [100.0]
    engine.control.pins.clock = lambda: now[0]
    handle = engine.prewarm(_prompt(3, 64), pin=True, ttl=5.0)
    assert engine.core.blocks.cache.num_locked_blocks == 4
    now[0] += 4.0
    engine.control.pins.expire()
    assert engine.core.blocks.cache.num_locked_blocks == 4
    now[0] += 2.0
    engine.generate([1, 2, 3], SamplingParams(max_tokens=1))  # any step expires pins
    assert engine.core.blocks.cache.num_locked_blocks == 0 and not engine.unpin(handle)


def test_flush_drops_everything_not_pinned(tiny_llama):
    engine = _engine(tiny_llama)
    kept = engine.prewarm(_prompt(4, 64), pin=True)
    engine.prewarm(_prompt(5, 64))
    freed = engine.flush_cache()
    assert freed == 4
    assert engine.core.blocks.cache.peek(_prompt(4, 64)) == 64
    assert engine.core.blocks.cache.peek(_prompt(5, 64)) == 0
    engine.unpin(kept)
    engine.check_integrity()


def test_bad_ttl_is_refused(tiny_llama):
    engine = _engine(tiny_llama)
    before = engine.stats()
    with pytest.raises(ValueError, match="ttl"):
        engine.prewarm(_prompt(6, 40), pin=True, ttl=-1)
    assert engine.stats() == before
