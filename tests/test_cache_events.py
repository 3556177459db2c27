"""Cache events: engines say which chunk chains they hold, for prefix-affinity routers."""

from __future__ import annotations

import asyncio
import random

import numpy as np

from chunking.hashing import chunk_hashes, root_seed
from prefixcache import Engine, SamplingParams
from prefixcache.client import ChunkEvent, InProcessEngineClient

CHUNK = 64
PARAMS = SamplingParams(max_tokens=2)


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return Engine.from_pretrained(
        str(folder), device="cpu", dtype="float32", chunk_size=CHUNK, **kwargs
    )


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


def _hashes(engine: Engine, prompt: list[int], salt: str | None = None) -> list[int]:
    """The chained hashes of the full chunks of ``prompt``, as a router computes them."""
    seed = root_seed(engine.limits.fingerprint, salt)
    return chunk_hashes(np.asarray(prompt, dtype=np.int32), CHUNK, seed)


def _collect(engine: Engine) -> list[list[ChunkEvent]]:
    batches: list[list[ChunkEvent]] = []
    engine.core.subscribe_cache_events(batches.append)
    return batches


def _hashes_of(batches, kind: str, salt=...) -> list[int]:
    return [
        h
        for batch in batches
        for event in batch
        if event.kind == kind and (salt is ... or event.salt == salt)
        for h in event.chunk_hashes
    ]


def test_full_chunks_of_a_prompt_are_published_as_stored_with_their_salt(tiny_llama):
    engine = _engine(tiny_llama)
    batches = _collect(engine)
    prompt = _prompt(1, 3 * CHUNK + 20)  # three full chunks and a partial one
    engine.generate(prompt, PARAMS, salt="acme")
    assert _hashes_of(batches, "stored", "acme") == _hashes(engine, prompt, "acme")
    assert _hashes_of(batches, "evicted") == []
    # Another tenant's chains differ, and it is told apart by its salt.
    engine.generate(prompt, PARAMS, salt="other")
    assert _hashes_of(batches, "stored", "other") == _hashes(engine, prompt, "other")
    assert not set(_hashes(engine, prompt, "acme")) & set(_hashes(engine, prompt, "other"))


def test_events_are_batched_one_list_per_step(tiny_llama):
    engine = _engine(tiny_llama)
    batches = _collect(engine)
    # Two prompts prefilled in the same step: one batch, one event per salt.
    engine.generate([_prompt(2, 2 * CHUNK), _prompt(3, 2 * CHUNK)], PARAMS)
    stored = [e for e in batches[0] if e.kind == "stored"]
    assert len(stored) == 1 and len(stored[0].chunk_hashes) == 4


def test_chunks_evicted_from_the_device_without_tiers_are_published(tiny_llama):
    engine = _engine(tiny_llama, kv_cache_tokens=8 * CHUNK)
    batches = _collect(engine)
    first = _prompt(4, 4 * CHUNK)
    engine.generate(first, PARAMS)
    engine.generate(_prompt(5, 6 * CHUNK), PARAMS)  # needs the blocks of ``first``
    evicted = _hashes_of(batches, "evicted")
    assert evicted and set(evicted) <= set(_hashes(engine, first))
    # Suffix first: a prefix never leaves before its continuation.
    order = _hashes(engine, first)
    assert sorted(evicted, key=order.index, reverse=True) == evicted


def test_chunks_offloaded_to_the_host_tier_are_not_evicted_until_it_drops_them(tiny_llama):
    engine = _engine(tiny_llama, kv_cache_tokens=8 * CHUNK, host_cache_tokens=4 * CHUNK)
    batches = _collect(engine)
    first = _prompt(6, 4 * CHUNK)
    engine.generate(first, PARAMS)
    engine.generate(_prompt(7, 6 * CHUNK), PARAMS)  # moves chunks of ``first`` to the host
    assert _hashes_of(batches, "evicted") == []
    host = engine.core.blocks.tiers.tier("host")
    assert host.stats().entries > 0
    for seed in range(8, 12):  # more evictions than the host tier holds
        engine.generate(_prompt(seed, 6 * CHUNK), PARAMS)
    evicted = set(_hashes_of(batches, "evicted"))
    assert set(_hashes(engine, first)) <= evicted


def test_flush_publishes_the_dropped_chunks(tiny_llama):
    engine = _engine(tiny_llama)
    batches = _collect(engine)
    prompt = _prompt(13, 2 * CHUNK + 5)
    engine.generate(prompt, PARAMS, salt="t1")
    engine.control.flush()
    engine.core.publish_cache_events()
    assert sorted(_hashes_of(batches, "evicted", "t1")) == sorted(_hashes(engine, prompt, "t1"))


def test_unsubscribed_callbacks_get_nothing_and_a_failing_one_harms_no_request(tiny_llama):
    engine = _engine(tiny_llama)
    got: list = []
    unsubscribe = engine.core.subscribe_cache_events(got.append)
    unsubscribe()

    def broken(events):
        raise RuntimeError("subscriber bug")

    engine.core.subscribe_cache_events(broken)
    out = engine.generate(_prompt(14, 2 * CHUNK), PARAMS)[0]
    assert out.finish_reason == "length" and got == []


def test_engine_client_delivers_events_from_the_loop_thread(tiny_llama):
    engine = _engine(tiny_llama)
    client = InProcessEngineClient(engine)
    batches: list[list[ChunkEvent]] = []
    client.subscribe_cache_events(batches.append)
    prompt = _prompt(15, 2 * CHUNK + 3)

    async def run() -> None:
        ids = np.asarray(prompt, dtype=np.int32)
        async for _ in client.generate(ids, PARAMS, salt="s"):
            pass
        await client.flush()

    try:
        asyncio.run(run())
    finally:
        client.shutdown()
    assert _hashes_of(batches, "stored", "s") == _hashes(engine, prompt, "s")
    assert sorted(_hashes_of(batches, "evicted", "s")) == sorted(_hashes(engine, prompt, "s"))


def test_chunks_the_disk_tier_drops_are_evicted_once_the_device_has_them_no_more(
    tiny_llama, tmp_path
):
    probe = _engine(tiny_llama, disk_cache_dir=tmp_path / "probe")
    probe.generate(_prompt(16, CHUNK), PARAMS)
    file_size = next((tmp_path / "probe").rglob("*.kv")).stat().st_size
    prompts = [_prompt(seed, CHUNK) for seed in range(17, 22)]
    for device_tokens, still_on_device in ((4096, True), (3 * CHUNK, False)):
        engine = _engine(
            tiny_llama,
            kv_cache_tokens=device_tokens,
            disk_cache_dir=tmp_path / str(device_tokens),
            disk_cache_bytes=3 * file_size,  # the disk drops the first prompt's file
        )
        batches = _collect(engine)
        engine.generate(prompts[0], PARAMS)
        read_before = engine.stats()["disk_read_bytes"]
        for prompt in prompts[1:]:
            engine.generate(prompt, PARAMS)
        assert engine.stats()["disk_evicted_blocks"] > 0
        evicted = set(_hashes_of(batches, "evicted"))
        assert set(_hashes(engine, prompts[0])).isdisjoint(evicted) == still_on_device
        assert engine.stats()["disk_read_bytes"] == read_before  # names known: no file read
