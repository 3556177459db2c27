"""The cache-control endpoints over HTTP: pre-warm, pin, unpin, flush, inspect."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_harness import running_server

BLOCK = 16
KEY_A, KEY_B = "cache-key-a", "cache-key-b"
SYSTEM = [{"role": "system", "content": "You answer from the documents below. " * 8}]


@pytest.fixture(scope="module")
def served(tiny_llama):
    options = {"kv_cache_tokens": 2048, "max_model_len": 1024, "max_pinned_tokens": 256}
    with running_server(str(tiny_llama), engine_options=options, api_keys=(KEY_A, KEY_B)) as s:
        yield s


@pytest.fixture
def http(served):
    with _client(served, KEY_A) as client:
        yield client


def _client(served, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=served.url, trust_env=False, timeout=60, headers=headers)


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 600 + 3 for i in range(n)]


def _prewarm(http: httpx.Client, **body) -> dict:
    response = http.post("/v1/cache/prewarm", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _chat(served, key: str, messages, **kwargs):
    client = openai.OpenAI(
        base_url=served.api_url,
        api_key=key,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=60),
    )
    kwargs = {"max_tokens": 2, "temperature": 0, **kwargs}
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def test_prewarmed_messages_are_reused_by_a_later_chat(served, http):
    warmed = _prewarm(http, messages=SYSTEM)
    assert warmed["handle"] is None and not warmed["pinned"]
    assert warmed["num_cached_tokens"] == warmed["num_tokens"] // BLOCK * BLOCK > 0
    reply = _chat(served, KEY_A, SYSTEM + [{"role": "user", "content": "hi"}])
    assert reply.usage.prompt_tokens_details.cached_tokens >= warmed["num_cached_tokens"]


def test_prewarm_under_one_key_is_invisible_to_another(served, http):
    messages = SYSTEM + [{"role": "user", "content": "Tenant A's private document. " * 6}]
    _prewarm(http, messages=messages)
    other = _chat(served, KEY_B, messages)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    salted = _chat(served, KEY_A, messages, extra_body={"cache_salt": "elsewhere"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0


def test_pin_handle_belongs_to_the_key_that_made_it(served, http):
    pin = _prewarm(http, prompt=_prompt(1, 64), pin=True, ttl_s=600)
    assert pin["pinned"] and pin["num_cached_tokens"] == 64 and pin["expires_at"] > 0
    with _client(served, KEY_B) as other:
        assert other.delete(f"/v1/cache/pins/{pin['handle']}").status_code == 404
    assert http.delete("/v1/cache/pins/pin-1.forged").status_code == 404
    deleted = http.delete(f"/v1/cache/pins/{pin['handle']}")
    assert deleted.status_code == 200 and deleted.json()["deleted"]
    again = http.delete(f"/v1/cache/pins/{pin['handle']}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "pin_not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/cache/prewarm"),
        ("DELETE", "/v1/cache/pins/pin-1.x"),
        ("POST", "/v1/cache/flush"),
        ("GET", "/v1/cache"),
    ],
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_cache_endpoints_need_a_valid_key(served, method, path, key):
    with _client(served, key) as client:
        response = client.request(method, path, json={"prompt": "hello"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_flush_keeps_pinned_and_drops_the_rest(served, http):
    pinned = _prewarm(http, prompt=_prompt(2, 70), pin=True)
    _prewarm(http, prompt=_prompt(3, 70))
    flushed = http.post("/v1/cache/flush")
    assert flushed.status_code == 200 and flushed.json()["freed_blocks"] >= 4
    assert _prewarm(http, prompt=_prompt(2, 70))["num_reused_tokens"] == 64
    assert _prewarm(http, prompt=_prompt(3, 70))["num_reused_tokens"] == 0
    assert http.delete(f"/v1/cache/pins/{pinned['handle']}").status_code == 200


def test_pin_over_the_cap_is_a_clear_400(served, http):
    response = http.post("/v1/cache/prewarm", json={"prompt": _prompt(4, 300), "pin": True})
    assert response.status_code == 400
    assert "pinned-token cap" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": "a", "pin": True, "ttl_s": -1},
        {"prompt": [10**9]},
        {"prompt": "a", "model": "other"},
    ],
)
def test_bad_prewarm_bodies_are_refused(http, body):
    response = http.post("/v1/cache/prewarm", json=body)
    assert response.status_code in (400, 404)
    assert response.json()["error"]["message"]


def test_cache_info_reports_tiers_counters_and_pins(served, http):
    pin = _prewarm(http, prompt=_prompt(5, 48), pin=True)
    info = http.get("/v1/cache").json()
    device = info["tiers"][0]
    assert device["name"] == "device" and device["capacity_blocks"] == 2048 // BLOCK
    assert device["locked_blocks"] >= 3 and info["pins"]["count"] >= 1
    assert info["counters"]["query_tokens"] >= info["counters"]["hit_tokens"]
    http.delete(f"/v1/cache/pins/{pin['handle']}")


def test_openapi_lists_the_cache_endpoints_and_schemas(served):
    with _client(served, None) as client:
        doc = client.get("/openapi.json").json()
    assert {"/v1/cache/prewarm", "/v1/cache/flush", "/v1/cache"} <= set(doc["paths"])
    assert "CachePrewarmRequest" in doc["components"]["schemas"]
