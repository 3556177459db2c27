"""The Redis KV tier: engines share prefixes through a real redis-server, safely."""

from __future__ import annotations

import random
import threading

import httpx
import numpy as np
import openai
import pytest
from redis_server import RedisServer, require_redis
from server_harness import on_engine, running_server

from prefixcache import Engine, SamplingParams
from prefixcache.tiers.chunk_chains import ChunkChains
from prefixcache.tiers.redis import KEY_PREFIX, chunk_name, index_name
from prefixcache.tiers.redis_link import WriteBehind

CHUNK = 64
PARAMS = SamplingParams(max_tokens=4, logprobs=True)
_WAIT_S = 60.0  # a bound on waiting for a thread, never a synchronization
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
    outs: list = []
    steps = threading.Thread(target=lambda: outs.extend(engine.generate(prompts, PARAMS)))
    steps.start()
    steps.join(_WAIT_S)  # a bound on waiting: the engine must finish with the writer held
    finished = not steps.is_alive()
    stuck.set()
    steps.join()
    assert finished, "engine steps waited for the Redis write queue"
    assert all(o.finish_reason == "length" for o in outs)
    assert tier.writer.dropped > 0
    assert engine.stats()["redis_dropped_writes"] == tier.writer.dropped
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


def test_a_full_redis_refusing_writes_counts_failures_and_still_serves_reads(
    tiny_llama, redis_url, redis_server
):
    a = _engine(tiny_llama, redis_url)
    stored = _prompt(21, 2 * CHUNK)
    a.generate(stored, PARAMS)
    _tier(a).drain()
    client = redis_server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")  # already over it: every write is refused
    try:
        b = _engine(tiny_llama, redis_url)
        b.generate(_prompt(22, 2 * CHUNK), PARAMS)
        _tier(b).drain()
        assert b.stats()["redis_failures"] >= 1 and _tier(b).link.is_up
        assert b.generate(stored, PARAMS)[0].num_cached_tokens == len(stored) - 16
    finally:
        client.config_set("maxmemory", "256mb")
        client.config_set("maxmemory-policy", "allkeys-lru")


def test_chunks_only_redis_holds_are_published_as_evicted_by_the_engine(tiny_llama, redis_url):
    engine = _engine(tiny_llama, redis_url, kv_cache_tokens=8 * CHUNK)
    batches: list = []
    engine.core.subscribe_cache_events(batches.append)
    first = _prompt(23, 4 * CHUNK)
    engine.generate(first, PARAMS)
    engine.generate(_prompt(24, 6 * CHUNK), PARAMS)  # evicts chunks of ``first``
    evicted = {h for batch in batches for e in batch if e.kind == "evicted" for h in e.chunk_hashes}
    chains = ChunkChains(engine.limits.fingerprint, None, CHUNK)
    chains.extend_to(np.asarray(first, dtype=np.int32))
    assert evicted and evicted <= {chains.chunk_hash(c) for c in range(chains.num_chunks)}
    _tier(engine).drain()  # yet Redis holds them, for every engine
    assert engine.generate(first, PARAMS)[0].num_cached_tokens == len(first) - 16


def test_two_servers_share_a_conversation_per_api_key_and_never_across_keys(tiny_llama, redis_url):
    options = dict(dtype="float32", chunk_size=CHUNK, kv_cache_tokens=4096, kv_store=redis_url)
    keys = ("key-a", "key-b")
    messages = [{"role": "user", "content": "Shared history of a long conversation. " * 12}]
    with (
        running_server(str(tiny_llama), engine_options=options, api_keys=keys) as first,
        running_server(str(tiny_llama), engine_options=options, api_keys=keys) as second,
    ):

        def chat(server, key: str):
            client = openai.OpenAI(
                base_url=server.api_url,
                api_key=key,
                max_retries=0,
                http_client=httpx.Client(trust_env=False, timeout=60),
            )
            return client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=3, temperature=0
            )

        on_first = chat(first, "key-a")
        on_engine(first.client, lambda e: _tier(e).drain())
        other_key = chat(second, "key-b")
        assert other_key.usage.prompt_tokens_details.cached_tokens == 0
        same_key = chat(second, "key-a")
        prompt_tokens = same_key.usage.prompt_tokens
        assert same_key.usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // 16 * 16
        assert same_key.choices[0].message.content == on_first.choices[0].message.content
        assert second.metric("prefixcache_prefix_cache_hit_tokens_total", tier="redis") > 0
