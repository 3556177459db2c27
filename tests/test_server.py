"""The OpenAI-compatible server, end to end: a real uvicorn server and the openai client."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import openai
import pytest
from engine_hooks import forward_gate, step_until_idle
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ENGINE_KINDS, running_server

BLOCK = 16
KEY_A, KEY_B = "key-a", "key-b"
LONG_TEXT = (
    "The server keeps a cache of every prefix it has seen, so a request that starts "
    "the way an earlier one did can skip most of its work. "
)


@pytest.fixture(scope="module", params=ENGINE_KINDS)
def served(tiny_llama, request):
    """The server, with its engine on a thread and then in its own process: the HTTP
    contract is the same."""
    with running_server(
        str(tiny_llama),
        engine_options={"kv_cache_tokens": 8192, "max_model_len": 2048},
        engine=request.param,
        api_keys=(KEY_A, KEY_B),
    ) as server:
        yield server


def _needs_engine_thread(served) -> None:
    if not served.in_process:
        pytest.skip(
            "holds the forward pass of an engine thread (test_engine_process.py "
            "covers hang-ups with an engine process)"
        )


def _client(served, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.api_url,
        api_key=key,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=60),
    )


def _http(key: str | None = KEY_A, base_url: str = "") -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(trust_env=False, timeout=60, headers=headers, base_url=base_url)


def _chat(client, messages, **kwargs):
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def _stream_chat(client, messages, **kwargs) -> tuple[str, list]:
    stream = _chat(client, messages, stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def _floor_block(n: int) -> int:
    return n // BLOCK * BLOCK


def test_models_lists_the_served_model(served):
    models = _client(served).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_health_answers_ok_without_a_key(served):
    with _http(key=None) as http:
        response = http.get(served.url + "/health")
    assert response.status_code == 200


def test_turn_two_reuses_turn_one_prompt_non_streaming(served):
    client = _client(served)
    messages = [{"role": "user", "content": "Non-streaming turn one. " + LONG_TEXT * 3}]
    first = _chat(client, messages)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the second turn?"},
    ]
    second = _chat(client, messages)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= _floor_block(first.usage.prompt_tokens) > 0
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_turn_two_reuses_turn_one_prompt_streaming(served):
    client = _client(served)
    messages = [{"role": "user", "content": "Streaming turn one. " + LONG_TEXT * 3}]
    text, chunks = _stream_chat(client, messages)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens_details.cached_tokens == 0
    messages += [
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And the second turn?"},
    ]
    _, chunks = _stream_chat(client, messages)
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert cached >= _floor_block(usage.prompt_tokens) > 0


def test_stream_sends_role_first_and_finish_reason_last(served):
    _, chunks = _stream_chat(_client(served), [{"role": "user", "content": "Order of chunks."}])
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_text_equals_non_streamed_text(served):
    client = _client(served)
    messages = [{"role": "user", "content": "Same answer both ways, please. " + LONG_TEXT}]
    reference = _chat(client, messages, max_tokens=12)
    text, chunks = _stream_chat(client, messages, max_tokens=12)
    assert text == reference.choices[0].message.content
    usage = chunks[-1].usage
    assert usage.completion_tokens == reference.usage.completion_tokens
    assert usage.prompt_tokens == reference.usage.prompt_tokens


def test_a_stop_string_ends_the_stream_where_the_unstopped_reply_first_has_it(served):
    client = _client(served)
    messages = [{"role": "user", "content": "Stop where asked. " + LONG_TEXT}]
    full, _ = _stream_chat(client, messages, max_tokens=24, extra_body={"ignore_eos": True})
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    text, chunks = _stream_chat(
        client, messages, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert text == full[: full.find(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens < 24
    assert served.wait_until_idle()["locked_blocks"] == 0


def test_completions_stream_and_non_stream_agree_on_token_id_prompts(served):
    client = _client(served)
    prompt = list(range(40, 90))
    reference = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert reference.usage.prompt_tokens == len(prompt)
    stream = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.choices[0].text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= _floor_block(len(prompt))


def test_completions_take_a_text_prompt_and_report_cached_tokens(served):
    client = _client(served)
    prompt = "Text completion prompt. " + LONG_TEXT
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model="tiny", prompt=[prompt], max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= _floor_block(
        first.usage.prompt_tokens - 1
    )
    assert again.choices[0].text == first.choices[0].text


def test_seeded_sampling_is_reproducible(served):
    client = _client(served)
    messages = [{"role": "user", "content": "Sample with a seed."}]
    kwargs = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 10}
    a = client.chat.completions.create(model="tiny", messages=messages, **kwargs)
    b = client.chat.completions.create(model="tiny", messages=messages, **kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_32_concurrent_streaming_clients_all_complete(served):
    prompts = [f"Concurrent client group {g}. " + LONG_TEXT for g in range(4)]
    client = _client(served)
    expected = [_chat(client, [{"role": "user", "content": p}]).choices[0].message.content
                for p in prompts]  # fmt: skip

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await aclient.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main() -> list[tuple[str, str | None]]:
        async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
            aclient = openai.AsyncOpenAI(
                base_url=served.api_url, api_key=KEY_A, max_retries=0, http_client=http
            )
            return await asyncio.gather(*(one(aclient, prompts[i % 4]) for i in range(32)))

    results = asyncio.run(main())
    assert [text for text, _ in results] == [expected[i % 4] for i in range(32)]
    assert all(finish in ("stop", "length") for _, finish in results)
    served.wait_until_idle()


# A request held at the engine's forward pass cannot end before its client hangs up;
# the cap only bounds the passes the server gets to notice that.
MAX_LONG_TOKENS = 1800


def _long_request(stream: bool) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": MAX_LONG_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def _aborted_count(served) -> float:
    return served.metric("prefixcache_requests_total", outcome="abort") or 0.0


def test_client_disconnecting_mid_stream_frees_its_blocks(served):
    _needs_engine_thread(served)
    before = _aborted_count(served)
    url = served.api_url + "/chat/completions"
    with forward_gate(served.client) as gate, _http() as http:
        with http.stream("POST", url, json=_long_request(True)) as r:
            assert r.status_code == 200
            for _ in range(2):  # the prefill and one decode step: two tokens are out
                gate.wait_until_held()
                gate.allow_one()
            gate.wait_until_held()  # and the request is still running
            data = (line for line in r.iter_lines() if line.startswith("data: "))
            assert '"role":"assistant"' in next(data)
            assert '"content":' in next(data)  # text was streamed: hang up mid-stream
        step_until_idle(served.client, gate, limit=MAX_LONG_TOKENS)
    stats = served.wait_until_idle()
    assert stats["locked_blocks"] == 0
    assert _aborted_count(served) == before + 1


def test_client_disconnecting_before_a_non_streamed_reply_aborts_it(served):
    _needs_engine_thread(served)
    before = _aborted_count(served)

    async def hang_up_while_running(gate) -> None:
        headers = {"Authorization": f"Bearer {KEY_A}"}
        async with httpx.AsyncClient(trust_env=False, timeout=60, headers=headers) as http:
            url = served.api_url + "/chat/completions"
            reply = asyncio.ensure_future(http.post(url, json=_long_request(False)))
            await asyncio.to_thread(gate.wait_until_held)  # admitted, in its prefill
            reply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reply

    with forward_gate(served.client) as gate:
        asyncio.run(hang_up_while_running(gate))
        step_until_idle(served.client, gate, limit=MAX_LONG_TOKENS)
    stats = served.wait_until_idle()
    assert stats["locked_blocks"] == 0
    assert _aborted_count(served) == before + 1


def test_missing_or_wrong_api_key_is_401(served):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for key in (None, "wrong-key"):
        with _http(key) as http:
            response = http.post(served.api_url + "/chat/completions", json=body)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(served, "wrong-key").models.list()


def test_two_api_keys_never_share_cached_tokens(served):
    messages = [{"role": "user", "content": "Tenant isolation check. " + LONG_TEXT * 2}]
    a, b = _client(served, KEY_A), _client(served, KEY_B)
    first_a, second_a = _chat(a, messages), _chat(a, messages)
    first_b, second_b = _chat(b, messages), _chat(b, messages)
    assert first_a.usage.prompt_tokens_details.cached_tokens == 0
    assert second_a.usage.prompt_tokens_details.cached_tokens > 0
    assert first_b.usage.prompt_tokens_details.cached_tokens == 0
    assert second_b.usage.prompt_tokens_details.cached_tokens > 0
    assert first_b.choices[0].message.content == first_a.choices[0].message.content


def test_cache_salt_separates_cache_entries_within_one_key(served):
    client = _client(served)
    messages = [{"role": "user", "content": "Salted request. " + LONG_TEXT * 2}]
    plain = _chat(client, messages)
    salted = _chat(client, messages, extra_body={"cache_salt": "project-x"})
    salted_again = _chat(client, messages, extra_body={"cache_salt": "project-x"})
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    assert salted_again.usage.prompt_tokens_details.cached_tokens > 0


def test_metrics_expose_counters_histograms_and_gauges(served):
    _chat(_client(served), [{"role": "user", "content": "Count me in the metrics."}])
    with _http(key=None) as http:
        response = http.get(served.url + "/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {
        "prefixcache_prompt_tokens": "counter",
        "prefixcache_generation_tokens": "counter",
        "prefixcache_requests": "counter",
        "prefixcache_prefix_cache_queried_tokens": "counter",
        "prefixcache_prefix_cache_hit_tokens": "counter",
        "prefixcache_prefix_cache_evicted_blocks": "counter",
        "prefixcache_time_to_first_token_seconds": "histogram",
        "prefixcache_e2e_request_latency_seconds": "histogram",
        "prefixcache_kv_blocks_in_use": "gauge",
        "prefixcache_kv_blocks_capacity": "gauge",
    }
    assert {name: families[name].type for name in expected} == expected
    hits = families["prefixcache_prefix_cache_hit_tokens"].samples
    assert any(s.labels.get("tier") == "device" for s in hits)
    outcomes = {s.labels["outcome"] for s in families["prefixcache_requests"].samples}
    assert "length" in outcomes or "stop" in outcomes
    assert families["prefixcache_kv_blocks_capacity"].samples[0].value == 8192 // BLOCK


def test_openapi_document_carries_the_msgspec_request_schemas(served):
    with _http(key=None) as http:
        doc = http.get(served.url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    assert "prompt" in schemas["CompletionRequest"]["properties"]
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"


# ------------------------------------------------- non-streamed = streamed, added up

_ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    return [json.loads(line[6:]) for line in lines]


def _without_clock(body: dict) -> dict:
    """``body`` less what differs between any two requests: ids, clocks, timings."""
    body = {k: v for k, v in body.items() if k not in ("id", "created", "created_at")}
    if "output" in body:  # a response's output items have ids of their own
        body["output"] = [_without_clock(item) for item in body["output"]]
    if isinstance(body.get("usage"), dict):
        body["usage"] = {k: v for k, v in body["usage"].items() if k != "timings"}
    return body


def _streamed_body(kind: str, chunks: list[dict]) -> dict:
    """The non-streamed body ``chunks`` add up to (chat or completions)."""
    text_key = "content" if kind == "chat" else "text"
    pieces = [c["choices"][0].get("delta", c["choices"][0]) for c in chunks if c["choices"]]
    text = "".join(p.get(text_key) or "" for p in pieces)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    return {"text": text, "finish_reason": finish, "usage": _without_clock(chunks[-1])["usage"]}


def _answered_body(kind: str, body: dict) -> dict:
    choice = body["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    usage = _without_clock(body)["usage"]
    return {"text": text, "finish_reason": choice["finish_reason"], "usage": usage}


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("cut", ["stop string", "max_tokens"])
def test_a_non_streamed_body_holds_what_the_same_request_streamed_adds_up_to(served, kind, cut):
    # Non-streamed requests get only the finishing delta (final_only); nothing else may
    # change: text, finish reason and usage, stop strings included.
    body = {"model": "tiny", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    prompt = f"Once, as {kind} ending at {cut}. " + LONG_TEXT
    body |= {"messages": [{"role": "user", "content": prompt}]} if kind == "chat" else {}
    body |= {"prompt": prompt} if kind == "completions" else {}
    with _http(base_url=served.url) as http:
        full = _answered_body(kind, http.post(_ROUTES[kind], json=body).json())  # caches it
        if cut == "stop string":
            body["stop"] = [full["text"][len(full["text"]) // 2 :][:2]]
        events = _events(http, _ROUTES[kind], {**body, "stream_options": {"include_usage": True}})
        answered = _answered_body(kind, http.post(_ROUTES[kind], json=body).json())
    assert answered == _streamed_body(kind, events)
    assert answered["finish_reason"] == ("stop" if cut == "stop string" else "length")
    assert (answered["usage"]["completion_tokens"] < 24) == (cut == "stop string")
    assert answered["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert served.wait_until_idle()["locked_blocks"] == 0


def test_a_non_streamed_response_equals_the_streamed_one_it_completes(served):
    body = {"model": "tiny", "input": "Answer once. " + LONG_TEXT, "max_output_tokens": 12}
    body |= {"temperature": 0, "store": False}
    with _http(base_url=served.url) as http:
        http.post("/v1/responses", json=body).raise_for_status()  # caches the prompt
        events = _events(http, "/v1/responses", body)
        answered = http.post("/v1/responses", json=body).json()
    (completed,) = [e["response"] for e in events if e["type"] == "response.completed"]
    assert _without_clock(answered) == _without_clock(completed)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert answered["output"][0]["content"][0]["text"] == deltas
    assert answered["usage"]["output_tokens"] == 12


@pytest.mark.parametrize("stream", [False, True])
def test_only_non_streamed_requests_ask_the_engine_for_the_final_delta_only(
    served, monkeypatch, stream
):
    asked, generate = [], served.client.generate

    def recording(*args, **kwargs):
        asked.append(kwargs.get("final_only", False))
        return generate(*args, **kwargs)

    monkeypatch.setattr(served.client, "generate", recording)
    body = {"model": "tiny", "prompt": "Which way? " + LONG_TEXT, "max_tokens": 3}
    with _http(base_url=served.url) as http:
        for path, extra in (("/v1/completions", {}), ("/v1/responses", {"store": False})):
            request = {**body, **extra, "stream": stream}
            if path == "/v1/responses":
                request = {"model": "tiny", "input": body["prompt"], "max_output_tokens": 3}
                request |= {"stream": stream, **extra}
            with http.stream("POST", path, json=request) as response:
                assert response.status_code == 200, response.read()
                response.read()
    assert asked == [not stream, not stream]
