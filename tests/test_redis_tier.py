"""The Redis KV tier: engines share prefixes through a real redis-server, safely."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from redis_server import RedisServer, require_redis

from prefixcache import Engine, SamplingParams
from prefixcache.tiers.chunk_chains import ChunkChains
from prefixcache.tiers.redis import KEY_PREFIX, chunk_name, index_name
from prefixcache.tiers.redis_link import WriteBehind

CHUNK = 64
PARAMS = SamplingParams(max_tokens=4, logprobs=True)
LOGPROB_TOLERANCE = 1e-4  # float32 reorderings between a cached and a full prefill


@pytest.fixture(scope="module")
def redis_server():
    require_redis()
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The module's server, emptied for each test."""
    redis_server.client().flushall()
    return redis_server.url


def _engine(folder, kv_store: str | None, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return Engine.from_pretrained(
        str(folder), device="cpu", dtype="float32", chunk_size=CHUNK, kv_store=kv_store, **kwargs
    )


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


def _tier(engine: Engine):
    return engine.core.blocks.tiers.tier("redis")


def _redis_hits(engine: Engine) -> int:
    return engine.stats()["redis_hit_tokens"]


def _names(engine: Engine, prompt: list[int], salt: str | None = None) -> list[str]:
    """The Redis keys of the full chunks of ``prompt``."""
    chains = ChunkChains(engine.limits.fingerprint, salt, CHUNK)
    chains.extend_to(np.asarray(prompt, dtype=np.int32))
    fp = engine.limits.fingerprint
    return [
        chunk_name(fp, chains.parent(c), chains.chunk_hash(c)) for c in range(chains.num_chunks)
    ]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Cache-off outputs (ids and logprobs), computed once per prompt."""
    engine = _engine(tiny_llama, None, enable_prefix_caching=False)
    return lambda prompt, salt=None: engine.generate(prompt, PARAMS)[0]


def _same_output(out, ref) -> None:
    assert out.token_ids == ref.token_ids
    assert out.logprobs == pytest.approx(ref.logprobs, abs=LOGPROB_TOLERANCE)


def test_prefix_computed_by_one_engine_is_reused_by_another_with_identical_logprobs(
    tiny_llama, redis_url, reference
):
    a, b = _engine(tiny_llama, redis_url), _engine(tiny_llama, redis_url)
    prompt = _prompt(1, 5 * CHUNK + 21)
    _same_output(a.generate(prompt, PARAMS)[0], reference(prompt))
    _tier(a).drain()
    out = b.generate(prompt, PARAMS)[0]
    _same_output(out, reference(prompt))
    assert out.num_cached_tokens == len(prompt) // 16 * 16  # down to a block
    assert _redis_hits(b) == out.num_cached_tokens
    # The KV B read is the very KV A computed: B's output is bit-identical to A's own hit.
    hit_on_a = a.generate(prompt, PARAMS)[0]
    assert hit_on_a.num_cached_tokens == out.num_cached_tokens
    assert (out.token_ids, out.logprobs) == (hit_on_a.token_ids, hit_on_a.logprobs)
    # A longer prompt on B: the shared part comes from Redis, the rest is computed.
    longer = prompt + _prompt(2, 3 * CHUNK)
    out = b.generate(longer, PARAMS)[0]
    _same_output(out, reference(longer))
    assert out.num_cached_tokens >= len(prompt) // 16 * 16
    b.check_integrity()


def test_another_tenant_never_matches_chunks_stored_by_one(tiny_llama, redis_url):
    a, b = _engine(tiny_llama, redis_url), _engine(tiny_llama, redis_url)
    prompt = _prompt(3, 4 * CHUNK)
    a.generate(prompt, PARAMS, salt="tenant-a")
    _tier(a).drain()
    assert b.generate(prompt, PARAMS, salt="tenant-b")[0].num_cached_tokens == 0
    assert b.generate(prompt, PARAMS)[0].num_cached_tokens == 0  # nor the default tenant
    assert _redis_hits(b) == 0
    c = _engine(tiny_llama, redis_url)
    assert c.generate(prompt, PARAMS, salt="tenant-a")[0].num_cached_tokens > 0


def test_another_model_never_matches(tiny_llama, tiny_model_factory, redis_url, redis_server):
    a = _engine(tiny_llama, redis_url)
    prompt = _prompt(4, 3 * CHUNK)
    a.generate(prompt, PARAMS)
    _tier(a).drain()
    other = _engine(tiny_model_factory("llama", seed=7), redis_url)
    assert other.limits.fingerprint != a.limits.fingerprint
    assert other.generate(prompt, PARAMS)[0].num_cached_tokens == 0
    # Even a value of the other model planted under this model's keys is refused.
    names, planted = _names(a, prompt), _names(other, prompt)
    client = redis_server.client()
    client.set(planted[0], client.get(names[0]))
    fp, root = other.limits.fingerprint, ChunkChains(other.limits.fingerprint, None, CHUNK)
    for n in range(1, CHUNK // 16 + 1):
        client.set(index_name(fp, root.root_digest, np.asarray(prompt[: n * 16])), planted[0])
    other_fresh = _engine(tiny_model_factory("llama", seed=7), redis_url)
    assert other_fresh.generate(prompt, PARAMS)[0].num_cached_tokens == 0
    _tier(other_fresh).drain()
    assert _tier(other_fresh).stats().failures >= 1


def _truncate(value: bytes, _other: bytes) -> bytes:
    return value[: len(value) - 100]


def _flip(value: bytes, _other: bytes) -> bytes:
    raw = bytearray(value)
    raw[-7] ^= 0x40  # a KV byte: only the checksum can tell
    return bytes(raw)


def _swap(_value: bytes, other: bytes) -> bytes:
    return other  # a whole, valid value of another chunk


@pytest.mark.parametrize(
    "damage", [_truncate, _flip, _swap], ids=["truncated", "corrupt", "mismatched"]
)
def test_bad_values_are_misses_and_get_deleted(
    tiny_llama, redis_url, redis_server, reference, damage
):
    a = _engine(tiny_llama, redis_url)
    prompt, other = _prompt(5, 2 * CHUNK), _prompt(6, 2 * CHUNK)
    a.generate(prompt, PARAMS)
    a.generate(other, PARAMS)
    _tier(a).drain()
    client, names = redis_server.client(), _names(a, prompt)
    good = client.get(names[0])
    bad = damage(good, client.get(_names(a, other)[0]))
    client.set(names[0], bad)
    b = _engine(tiny_llama, redis_url)
    out = b.generate(prompt, PARAMS)[0]
    _same_output(out, reference(prompt))
    assert out.num_cached_tokens == 0  # chunk 1 follows the bad chunk 0: not reachable
    assert b.stats()["redis_failures"] == 1 and _redis_hits(b) == 0
    # The bad value was deleted, so B's write-through could store the chunk again.
    _tier(b).drain()
    assert client.get(names[0]) == good
    c = _engine(tiny_llama, redis_url)
    assert c.generate(prompt, PARAMS)[0].num_cached_tokens == len(prompt) - 16


def test_a_full_write_queue_drops_writes_and_never_blocks_a_step(tiny_llama, redis_url):
    engine = _engine(tiny_llama, redis_url)
    tier = _tier(engine)
    tier.writer.close()
    tier.writer = WriteBehind(tier.link, max_pending=2)
    stuck, entered = threading.Event(), threading.Event()

    def hold(client) -> None:  # the writer thread waits here, as on a hung server
        entered.set()
        stuck.wait()

    tier.writer.submit(hold)
    assert entered.wait(60)
    prompts = [_prompt(10 + i, 3 * CHUNK) for i in range(4)]
    outs = engine.generate(prompts, PARAMS)  # returns while the writer is still held
    assert not stuck.is_set() and all(o.finish_reason == "length" for o in outs)
    assert tier.writer.dropped > 0
    assert engine.stats()["redis_dropped_writes"] == tier.writer.dropped
    stuck.set()
    tier.drain()
    assert tier.stats().written_bytes > 0  # what was queued was written after all


def test_keys_name_the_model_fingerprint(tiny_llama, redis_url, redis_server):
    a = _engine(tiny_llama, redis_url)
    prompt = _prompt(20, 2 * CHUNK)
    a.generate(prompt, PARAMS)
    _tier(a).drain()
    keys = {k.decode() for k in redis_server.client().keys(f"{KEY_PREFIX}:*")}
    assert set(_names(a, prompt)) <= keys
    assert all(k.startswith(f"{KEY_PREFIX}:{a.limits.fingerprint}:") for k in keys)
