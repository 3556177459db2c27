"""One API key cannot hurt another: stored responses, pins and flushes are per tenant."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from server_harness import running_server

from prefixcache import cli
from prefixcache.apps.response_store import ResponseStore, StoredResponse
from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.radix_cache import RadixCache
from prefixcache.cache.tenants import salt_tenant

KEY_A, KEY_B, ADMIN = "key-a", "key-b", "key-admin"
QUOTA, CAPACITY = 256, 300  # pinned tokens per tenant, and in all


def _entry(rid: str, scope: str, tokens: int = 4) -> StoredResponse:
    return StoredResponse(
        id=rid,
        scope=scope,
        created_at=0.0,
        messages=[{"role": "user", "content": "hi"}],
        text="hi",
        tokens=np.arange(tokens, dtype=np.int32).tobytes(),
        output_text="hello",
    )


def test_a_scope_over_its_bound_evicts_only_its_own_entries():
    store = ResponseStore(max_entries=100, max_entries_per_scope=3, clock=lambda: 0.0)
    store.put(_entry("resp_a", "tenant-a"))
    for i in range(10):
        store.put(_entry(f"resp_b{i}", "tenant-b"))
    assert store.get("resp_a", "tenant-a") is not None
    assert store.usage("tenant-b") == (3, 12)
    assert store.get("resp_b9", "tenant-b") is not None and store.get("resp_b0", "tenant-b") is None


def test_over_the_total_the_largest_scope_gives_way():
    store = ResponseStore(max_entries=5, max_tokens=1000, clock=lambda: 0.0)
    store.put(_entry("resp_a", "tenant-a", tokens=100))
    for i in range(20):
        store.put(_entry(f"resp_b{i}", "tenant-b", tokens=10))
    assert store.get("resp_a", "tenant-a") is not None and len(store) == 5


@pytest.fixture(scope="module")
def served(tiny_llama):
    store = ResponseStore(max_entries=6)
    with running_server(
        str(tiny_llama),
        engine_options={
            "kv_cache_tokens": 4096,
            "max_model_len": 1024,
            "max_pinned_tokens": CAPACITY,
            "max_pinned_tokens_per_tenant": QUOTA,
        },
        api_keys=(KEY_A, KEY_B),
        admin_api_keys=(ADMIN,),
        response_store=store,
    ) as server:
        yield server


def _http(key: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.Client(trust_env=False, timeout=60, headers=headers)


def _call(served, key: str, path: str, body: dict | None = None) -> httpx.Response:
    with _http(key) as http:
        return http.post(served.api_url + path, json=body or {})


def _ids(start: int, count: int) -> list[int]:
    return [10 + (start + i) % 200 for i in range(count)]


def test_one_keys_flood_of_responses_leaves_anothers_stored_response(served):
    first = _call(served, KEY_A, "/responses", {"input": "remember me", "max_output_tokens": 1})
    assert first.status_code == 200, first.text
    for i in range(10):  # more than the whole store holds
        flood = _call(served, KEY_B, "/responses", {"input": f"flood {i}", "max_output_tokens": 1})
        assert flood.status_code == 200, flood.text
    with _http(KEY_A) as http:
        kept = http.get(f"{served.api_url}/responses/{first.json()['id']}")
    assert kept.status_code == 200, kept.text


def _pin(served, key: str, ids: list[int]) -> httpx.Response:
    return _call(served, key, "/cache/prewarm", {"prompt": ids, "pin": True})


def test_pin_quota_is_per_key_and_its_error_names_only_the_callers_pins(served):
    a = _pin(served, KEY_A, _ids(0, 192))
    assert a.status_code == 200, a.text
    b = _pin(served, KEY_B, _ids(500, 96))  # A's pins do not count against B's quota
    assert b.status_code == 200, b.text
    try:
        over_quota = _pin(served, KEY_B, _ids(1000, 192))
        assert over_quota.status_code == 400
        message = over_quota.json()["error"]["message"]
        assert "96 of 256" in message and "192" in message  # the asked-for 192 tokens
        assert "288" not in message and str(CAPACITY) not in message
        over_capacity = _pin(served, KEY_B, _ids(1500, 32))  # B's own quota has room
        assert over_capacity.status_code == 400
        message = over_capacity.json()["error"]["message"]
        assert "your pins hold 96 of your 256" in message
        assert "192" not in message and "288" not in message and str(CAPACITY) not in message
    finally:
        for key, pinned in ((KEY_A, a), (KEY_B, b)):
            with _http(key) as http:
                http.delete(f"{served.api_url}/cache/pins/{pinned.json()['handle']}")


def _reused(served, key: str, ids: list[int]) -> int:
    response = _call(served, key, "/cache/prewarm", {"prompt": ids})
    assert response.status_code == 200, response.text
    return response.json()["num_reused_tokens"]


def test_flush_drops_only_the_callers_entries_unless_an_admin_flushes(served):
    mine, theirs = _ids(2000, 160), _ids(2500, 160)
    _reused(served, KEY_A, mine)
    _reused(served, KEY_B, theirs)
    assert _call(served, KEY_A, "/cache/flush").status_code == 200
    assert _reused(served, KEY_B, theirs) > 0
    assert _reused(served, KEY_A, mine) == 0  # cached again by this call
    flushed = _call(served, ADMIN, "/cache/flush")
    assert flushed.status_code == 200 and flushed.json()["freed_blocks"] > 0
    assert _reused(served, KEY_A, mine) == 0
    assert _reused(served, KEY_B, theirs) == 0


def _cached(cache: RadixCache, pool: BlockPool, tokens: list[int], salt: str | None) -> None:
    hit = cache.match(tokens, salt)
    fresh = pool.allocate(len(tokens) // cache.block_size - len(hit.block_ids))
    cache.insert(tokens, hit.block_ids + fresh, salt)
    cache.unlock(hit.node)


def test_a_tenant_flush_drops_all_its_salts_trees_and_nothing_else():
    pool = BlockPool(64)
    cache = RadixCache(pool, block_size=2, chunk_size=4, fingerprint="m")
    branches = ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8])  # a shared prefix, two leaves
    for salt in ("t1:", "t1:other", "t2:", "t10:", None):
        for tokens in branches:
            _cached(cache, pool, tokens, salt)
    held = cache.match([9, 9, 9, 9], "t1:")  # nothing cached: locks t1's root only
    kept = cache.match(branches[0], "t1:other")  # a running request's prefix
    assert cache.flush("t1") > 0
    assert cache.peek(branches[0], "t1:other") == 6  # locked: kept
    assert cache.peek(branches[1], "t1:other") == 4  # its shared prefix is locked too
    assert cache.peek(branches[1], "t1:") == 0
    for salt in ("t2:", "t10:", None):
        assert all(cache.peek(tokens, salt) == 6 for tokens in branches)
    cache.unlock(kept.node)
    cache.unlock(held.node)
    cache.check_integrity()
    assert salt_tenant("t1:abc") == "t1" and salt_tenant("plain") == "plain"
    assert salt_tenant(None) == ""


def test_admin_api_key_flag_reaches_the_server(monkeypatch, tiny_llama):
    calls = []
    monkeypatch.setattr("server.launch.serve", lambda model, options, **kw: calls.append(kw))
    argv = ["serve", "--model", str(tiny_llama), "--device", "cpu", "--max-model-len", "256"]
    argv += ["--api-key", "k1", "--admin-api-key", "root1", "--admin-api-key", "root2"]
    assert cli.main(argv) == 0
    (kwargs,) = calls
    assert kwargs["api_keys"] == ["k1"] and kwargs["admin_api_keys"] == ["root1", "root2"]
