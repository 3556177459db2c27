"""A tier written outside the project plugs in through ``register_kv_tier``: chunks the
host tier evicts land in it, come back from it, and a tier that fails or collides never
fails a request nor serves wrong KV."""

from __future__ import annotations

import random
from collections import OrderedDict

import httpx
import numpy as np
import pytest
from reference_outputs import memoized_outputs
from server_harness import on_engine, running_server

import chunking.hashing
from prefixcache import Engine, SamplingParams
from prefixcache.tiers import ChunkQuery, KVChunk, TierContext, TierStats, register_kv_tier

CHUNK = 64
PARAMS = SamplingParams(max_tokens=6, logprobs=True)
LOGPROB_TOLERANCE = 1e-4


class DictTier:
    """KV chunks in a dict keyed by chunk key, bounded by bytes, least recently used out
    first: the shape of a key-value server tier. It finds chunks by key alone; checking
    that a chunk fits the asker is the tiered cache's job."""

    name = "dict"
    persistent = False
    max_chunks = 32

    def __init__(self, max_bytes: int, block_size: int) -> None:
        self.max_bytes, self.block_size = max_bytes, block_size
        self.on_evict = None
        self.chunks: OrderedDict[int, KVChunk] = OrderedDict()  # oldest first
        self.used_bytes = self.stored_blocks = self.evicted_blocks = 0

    @classmethod
    def from_context(cls, context: TierContext) -> DictTier:
        """Room for ``max_chunks`` whole chunks of this engine's KV."""
        chunk_bytes = context.block_bytes * context.blocks_per_chunk
        return cls(cls.max_chunks * chunk_bytes, context.block_size)

    def contains(self, query: ChunkQuery) -> bool:
        chunk = self.chunks.get(query.key)
        return chunk is not None and chunk.covers(query)

    def touch(self, query: ChunkQuery) -> bool:
        found = self.contains(query)
        if found:
            self.chunks.move_to_end(query.key)
        return found

    def get(self, query: ChunkQuery) -> KVChunk | None:
        for n in range(len(query.tokens), 0, -self.block_size):  # longest first
            chunk = self.chunks.get(query.shorter(n).key)
            if chunk is not None:
                return chunk
        return None

    def put(self, chunk: KVChunk) -> bool:
        if chunk.key in self.chunks:  # the first writer of a key keeps it
            self.chunks.move_to_end(chunk.key)
            return False
        size = _nbytes(chunk)
        if size > self.max_bytes:
            return False
        while self.used_bytes + size > self.max_bytes:
            self._drop(next(iter(self.chunks.values())), evicted=True)
        copy = chunk._replace(tokens=chunk.tokens.copy(), data=chunk.data.to("cpu", copy=True))
        self.chunks[chunk.key] = copy
        self.used_bytes += size
        self.stored_blocks += len(chunk.tokens) // self.block_size
        return True

    def discard(self, chunk: KVChunk) -> None:
        held = self.chunks.get(chunk.key)
        if held is not None and (held.parent, held.start) == (chunk.parent, chunk.start):
            self._drop(held, evicted=False)

    def stats(self) -> TierStats:
        return TierStats(
            name=self.name,
            capacity_bytes=self.max_bytes,
            used_bytes=self.used_bytes,
            entries=len(self.chunks),
            stored_blocks=self.stored_blocks,
            evicted_blocks=self.evicted_blocks,
        )

    def check_integrity(self) -> None:
        assert self.used_bytes == sum(map(_nbytes, self.chunks.values())) <= self.max_bytes

    def _drop(self, chunk: KVChunk, evicted: bool) -> None:
        if evicted:
            if self.on_evict is not None:
                self.on_evict(chunk)
            self.evicted_blocks += len(chunk.tokens) // self.block_size
        del self.chunks[chunk.key]
        self.used_bytes -= _nbytes(chunk)


def _nbytes(chunk: KVChunk) -> int:
    return chunk.data.numel() * chunk.data.element_size()


class BrokenTier(DictTier):
    """A tier whose every call fails, like a server that is gone."""

    name = "broken"

    def contains(self, query):
        raise ConnectionError("tier unreachable")

    touch = get = put = discard = contains


register_kv_tier(DictTier.name, DictTier.from_context)
register_kv_tier(BrokenTier.name, BrokenTier.from_context)


def make_engine(folder, **kwargs) -> Engine:
    """A small CPU engine with hash chunks of ``CHUNK`` tokens."""
    kwargs.setdefault("kv_cache_tokens", 4096)
    kwargs.setdefault("chunk_size", CHUNK)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


@pytest.fixture
def dict_tier_engine(tiny_llama) -> Engine:
    """An engine with a host tier of two chunks and the dict tier behind it."""
    return make_engine(tiny_llama, host_cache_tokens=2 * CHUNK, kv_tiers=(DictTier.name,))


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Cache-off greedy token ids and logprobs, computed once per prompt."""
    return memoized_outputs(make_engine(tiny_llama, enable_prefix_caching=False), PARAMS)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


def _assert_same_as_cache_off(out, reference, prompt) -> None:
    token_ids, logprobs = reference(prompt)
    assert out.token_ids == token_ids
    assert out.logprobs == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE)


def _empty_device(engine: Engine) -> None:
    engine.core.blocks.cache.evict(engine.core.blocks.cache.num_evictable_blocks)


def test_chunks_evicted_from_host_land_in_the_registered_tier_and_come_back(
    dict_tier_engine, reference
):
    engine = dict_tier_engine
    prompt = _prompt(1, 4 * CHUNK + 21)  # four whole chunks and one block of a fifth
    engine.generate(prompt, SamplingParams(max_tokens=1))
    _empty_device(engine)  # five chunks for two host slots: three go on to the dict tier
    dict_tier = engine.core.blocks.tiers.tier(DictTier.name)
    assert len(dict_tier.chunks) == 3 and engine.stats()["host_evicted_blocks"] > 0
    out = engine.generate(prompt, PARAMS)[0]
    assert out.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    stats = engine.stats()
    assert stats["host_hit_tokens"] == 2 * CHUNK  # the first two chunks, most recent
    assert stats["dict_hit_tokens"] == out.num_cached_tokens - 2 * CHUNK > 0
    assert [t.name for t in engine.core.blocks.tiers.tier_stats()] == ["host", DictTier.name]
    _assert_same_as_cache_off(out, reference, prompt)
    engine.check_integrity()


def test_colliding_keys_in_a_key_addressed_tier_never_serve_other_kv(
    tiny_llama, reference, monkeypatch
):
    monkeypatch.setattr(chunking.hashing, "_xxh3", lambda data, seed=0: 7)  # every key is 7
    x, y, z = _prompt(2, CHUNK), _prompt(3, CHUNK), _prompt(4, CHUNK)
    engine = make_engine(tiny_llama, kv_tiers=(DictTier.name,))  # the dict tier alone
    engine.generate(z, SamplingParams(max_tokens=1))
    engine.generate(x + y, SamplingParams(max_tokens=1))
    keep = engine.core.blocks.cache.match(np.asarray(z, dtype=np.int32))  # z stays on the device
    _empty_device(engine)  # suffix first: y's chunk, after x, takes key 7
    engine.core.blocks.cache.unlock(keep.node)
    (held,) = engine.core.blocks.tiers.tier(DictTier.name).chunks.values()
    assert held.start == CHUNK and held.tokens.tolist() == y
    out = engine.generate(z + y, PARAMS)[0]
    # Asked for y after z, the tier answers y after x under the same key: same tokens,
    # same position, KV of another prefix. It is a miss, and the entry goes.
    assert out.num_cached_tokens == CHUNK and engine.stats()["dict_hit_tokens"] == 0
    assert not engine.core.blocks.tiers.tier(DictTier.name).chunks
    _assert_same_as_cache_off(out, reference, z + y)
    engine.check_integrity()


def test_a_failing_tier_is_a_miss_not_a_failed_request(tiny_llama, reference):
    engine = make_engine(
        tiny_llama, kv_cache_tokens=512, host_cache_tokens=2 * CHUNK, kv_tiers=(BrokenTier.name,)
    )
    prompts = [_prompt(s, 3 * CHUNK + 9) for s in range(10, 14)]
    for _ in range(2):  # the second round asks every tier for what the first evicted
        for prompt, out in zip(prompts, engine.generate(prompts, PARAMS), strict=True):
            _assert_same_as_cache_off(out, reference, prompt)
    stats = engine.stats()
    assert stats["broken_failures"] > 0 and stats["broken_hit_tokens"] == 0
    engine.check_integrity()


def test_unknown_or_malformed_tier_names_are_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"'nope'.*registered: .*host.*dict"):
        make_engine(tiny_llama, kv_tiers=("nope",))
    with pytest.raises(ValueError, match="kv_tiers must be a tuple"):
        make_engine(tiny_llama, kv_tiers="dict")
    with pytest.raises(ValueError, match="twice"):
        make_engine(tiny_llama, host_cache_tokens=CHUNK, kv_tiers=("host",))
    with pytest.raises(ValueError, match="registered already"):
        register_kv_tier(DictTier.name, BrokenTier.from_context)
    with pytest.raises(ValueError, match="tier name"):
        register_kv_tier("Bad Name", DictTier.from_context)


def test_chunks_leaving_the_disk_tier_move_on_to_the_next(tiny_llama, reference, tmp_path):
    prompt = _prompt(5, 4 * CHUNK + 21)
    probe = make_engine(tiny_llama, disk_cache_dir=tmp_path / "probe")
    probe.generate(prompt, SamplingParams(max_tokens=1))
    file_bytes = max(p.stat().st_size for p in (tmp_path / "probe").rglob("*.kv"))
    engine = make_engine(
        tiny_llama,
        disk_cache_dir=tmp_path / "bounded",
        disk_cache_bytes=2 * file_bytes,  # two of the five chunks written through
        kv_tiers=(DictTier.name,),
    )
    engine.generate(prompt, SamplingParams(max_tokens=1))
    assert engine.stats()["disk_evicted_blocks"] > 0
    engine.core.blocks.cache.flush()  # the device forgets, the tiers keep theirs
    out = engine.generate(prompt, PARAMS)[0]
    assert out.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    stats = engine.stats()
    assert stats["dict_hit_tokens"] > 0 and stats["disk_hit_tokens"] > 0
    assert stats["dict_hit_tokens"] + stats["disk_hit_tokens"] == out.num_cached_tokens
    _assert_same_as_cache_off(out, reference, prompt)
    engine.check_integrity()


def test_a_registered_tier_is_listed_by_the_server_with_its_counters(tiny_llama):
    options = {
        "kv_cache_tokens": 4096,
        "chunk_size": CHUNK,
        "host_cache_tokens": 2 * CHUNK,
        "kv_tiers": (DictTier.name,),
    }
    prompt = _prompt(6, 4 * CHUNK + 21)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    with running_server(str(tiny_llama), engine_options=options) as server:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
            assert http.post("/v1/completions", json=body).status_code == 200
            on_engine(server.client, _empty_device)  # host keeps two chunks, dict the rest
            reply = http.post("/v1/completions", json=body).json()
            tiers = {t["name"]: t for t in http.get("/v1/cache").json()["tiers"]}
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (len(prompt) - 1) // 16 * 16
        assert list(tiers) == ["device", "host", DictTier.name]
        dict_tier = tiers[DictTier.name]
        assert dict_tier["hit_tokens"] == cached - 2 * CHUNK > 0
        assert dict_tier["entries"] == 3 and dict_tier["stored_blocks"] > 0
        hits = server.metric("prefixcache_prefix_cache_hit_tokens_total", tier=DictTier.name)
        assert hits == dict_tier["hit_tokens"]
        assert server.metric("prefixcache_tier_entries", tier=DictTier.name) == 3
