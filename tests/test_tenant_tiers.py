"""Tenant salts hold in the host and disk tiers too, and across a restart.

Two tenants sending the same prompt must never share KV: a hit is observable (through
``cached_tokens`` and timing), so it would leak what the other tenant asked. Each test
also shows the tier did hold the first tenant's prefix (it reuses it for that tenant),
so a miss for the other tenant is the salt at work, not an empty tier.
"""

from __future__ import annotations

import itertools
import random

import httpx
import openai
import pytest
from server_harness import running_server

from prefixcache import Engine, SamplingParams

CHUNK = 64  # small hash chunks keep the prompts short
KV_TOKENS = 512  # a small device pool, so a filler prompt pushes everything to the host
PROMPT_TOKENS = 4 * CHUNK + 10
PARAMS = SamplingParams(max_tokens=4)


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", KV_TOKENS)
    return Engine.from_pretrained(
        str(folder), device="cpu", dtype="float32", chunk_size=CHUNK, **kwargs
    )


def _prompt(seed: int, n: int = PROMPT_TOKENS) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


_fillers = itertools.count(1000)


def _push_out_of_device(engine: Engine) -> None:
    """Fill the whole device pool with a new prompt: every cached block is evicted."""
    filler = _prompt(next(_fillers), KV_TOKENS - 8)
    engine.generate(filler, SamplingParams(max_tokens=1), salt="filler")


def _cached(engine: Engine, prompt: list[int], salt: str | None) -> int:
    return engine.generate(prompt, PARAMS, salt=salt)[0].num_cached_tokens


def _hits(engine: Engine) -> tuple[int, int]:
    stats = engine.stats()
    return stats.get("host_hit_tokens", 0), stats.get("disk_hit_tokens", 0)


def test_host_tier_never_serves_one_salts_kv_to_another(tiny_llama):
    engine = _engine(tiny_llama, host_cache_tokens=4096)
    prompt = _prompt(1)
    assert _cached(engine, prompt, "tenant-a") == 0
    _push_out_of_device(engine)
    assert engine.stats()["host_used_blocks"] >= 4 * CHUNK // 16
    for other in ("tenant-b", None):
        before = _hits(engine)
        assert _cached(engine, prompt, other) == 0
        assert _hits(engine) == before
        _push_out_of_device(engine)
    before = _hits(engine)
    assert _cached(engine, prompt, "tenant-a") == 4 * CHUNK  # the host tier still held it
    assert _hits(engine)[0] == before[0] + 4 * CHUNK
    engine.check_integrity()


def test_disk_tier_never_serves_one_salts_kv_to_another(tiny_llama, tmp_path):
    engine = _engine(tiny_llama, disk_cache_dir=tmp_path)
    prompt = _prompt(2)
    assert _cached(engine, prompt, "tenant-a") == 0
    assert engine.stats()["disk_written_bytes"] > 0
    for other in ("tenant-b", None):
        assert _cached(engine, prompt, other) == 0
    assert engine.stats()["disk_hit_tokens"] == 0
    _push_out_of_device(engine)
    assert _cached(engine, prompt, "tenant-a") == 4 * CHUNK  # the disk tier held it
    assert engine.stats()["disk_hit_tokens"] == 4 * CHUNK
    engine.check_integrity()


def test_disk_tier_keeps_salts_apart_after_a_restart(tiny_llama, tmp_path):
    prompt = _prompt(3)
    first = _engine(tiny_llama, disk_cache_dir=tmp_path)
    assert _cached(first, prompt, "tenant-a") == 0
    del first
    second = _engine(tiny_llama, disk_cache_dir=tmp_path, host_cache_tokens=4096)
    for other in ("tenant-b", None):
        assert _cached(second, prompt, other) == 0
    assert second.stats()["disk_hit_tokens"] == 0
    assert _cached(second, prompt, "tenant-a") == 4 * CHUNK
    assert second.stats()["disk_hit_tokens"] == 4 * CHUNK
    second.check_integrity()


# -- over HTTP: the salt comes from the API key -----------------------------------------

KEY_A, KEY_B = "key-a", "key-b"
QUESTION = "Which tenant asked this? " + "The same long question from two tenants. " * 30


def _client(url: str, key: str) -> openai.OpenAI:
    http = httpx.Client(trust_env=False, timeout=60)
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, http_client=http)


def _ask(url: str, key: str) -> int:
    """Send ``QUESTION`` with ``key``; the prompt tokens it got from the cache."""
    reply = _client(url, key).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=4,
        temperature=0,
    )
    return reply.usage.prompt_tokens_details.cached_tokens


def _push_out_of_server(url: str) -> None:
    """Fill the server's whole device pool with a new prompt (token ids)."""
    filler = _prompt(next(_fillers), KV_TOKENS - 8)
    _client(url, KEY_A).completions.create(model="tiny", prompt=filler, max_tokens=1)


def _serve(model, **options):
    engine_options = {"kv_cache_tokens": KV_TOKENS, "chunk_size": CHUNK, **options}
    return running_server(str(model), engine_options=engine_options, api_keys=(KEY_A, KEY_B))


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_two_api_keys_never_share_kv_through_a_lower_tier(tiny_llama, tmp_path, tier):
    options = {"host_cache_tokens": 4096} if tier == "host" else {"disk_cache_dir": str(tmp_path)}
    with _serve(tiny_llama, **options) as server:
        assert _ask(server.api_url, KEY_A) == 0
        _push_out_of_server(server.api_url)
        assert _ask(server.api_url, KEY_B) == 0
        _push_out_of_server(server.api_url)
        assert _ask(server.api_url, KEY_A) >= 2 * CHUNK  # back from the tier
        server.wait_until_idle()


def test_two_api_keys_never_share_kv_from_disk_after_a_restart(tiny_llama, tmp_path):
    with _serve(tiny_llama, disk_cache_dir=str(tmp_path)) as server:
        assert _ask(server.api_url, KEY_A) == 0
    with _serve(tiny_llama, disk_cache_dir=str(tmp_path)) as server:
        assert _ask(server.api_url, KEY_B) == 0
        assert _ask(server.api_url, KEY_A) >= 2 * CHUNK
