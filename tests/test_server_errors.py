"""Every client error gets its status and an OpenAI error body; the server never 500s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from engine_hooks import forward_gate
from server_harness import running_server

MAX_MODEL_LEN = 512
MAX_BODY = 1 << 16
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def served(tiny_llama):
    # One running request at a time and no queue, so a second concurrent request is a 429.
    with running_server(
        str(tiny_llama),
        engine_options={
            "kv_cache_tokens": 4096,
            "max_model_len": MAX_MODEL_LEN,
            "max_num_seqs": 1,
        },
        max_queue=0,
        max_body_bytes=MAX_BODY,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def http():
    with httpx.Client(trust_env=False, timeout=60) as client:
        yield client


def _assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def _chat_body(**fields) -> dict:
    return {"model": "tiny", "messages": USER, "max_tokens": 4, **fields}


MALFORMED = [
    pytest.param(b"{", id="truncated-json"),
    pytest.param(b"not json at all", id="not-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"[]", id="array-body"),
    pytest.param(b"null", id="null-body"),
    pytest.param(b'{"messages": "\\ud800"}', id="lone-surrogate"),
    pytest.param(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', id="bad-utf8"),
    pytest.param(b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="deep-nesting"),
]


@pytest.mark.parametrize("body", MALFORMED)
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_malformed_json_is_400(served, http, path, body):
    _assert_error(http.post(served.api_url + path, content=body), 400)


INVALID_CHAT = [
    pytest.param({"messages": "hi"}, "messages", id="messages-not-a-list"),
    pytest.param({"messages": []}, "messages", id="empty-messages"),
    pytest.param(
        {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", id="unknown-role"
    ),  # fmt: skip
    pytest.param({"messages": [{"role": "user"}]}, "messages[0]", id="missing-content"),
    pytest.param(
        {"messages": [{"role": "user", "content": 3}]},
        "messages[0].content",
        id="content-wrong-type",
    ),  # fmt: skip
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
        id="image-part",
    ),
    pytest.param(_chat_body(max_tokens="10"), "max_tokens", id="max-tokens-string"),
    pytest.param(_chat_body(max_tokens=0), "max_tokens", id="max-tokens-zero"),
    pytest.param(_chat_body(max_tokens=1.5), "max_tokens", id="max-tokens-float"),
    pytest.param(_chat_body(temperature=-1), "temperature", id="negative-temperature"),
    pytest.param(
        json.dumps(_chat_body(temperature=1)).replace('"temperature": 1', '"temperature": 1e400'),
        "temperature",
        id="infinite-temperature",
    ),
    pytest.param(_chat_body(top_p=0), "top_p", id="top-p-zero"),
    pytest.param(_chat_body(top_p=1.5), "top_p", id="top-p-over-one"),
    pytest.param(_chat_body(top_k=-5), "top_k", id="negative-top-k"),
    pytest.param(_chat_body(seed=2**70), "seed", id="huge-seed"),
    pytest.param(_chat_body(stream="yes"), "stream", id="stream-not-bool"),
    pytest.param(_chat_body(n=2), "n", id="n-above-one"),
    pytest.param(_chat_body(stop=[""]), None, id="empty-stop-string"),
    pytest.param(_chat_body(stop=5), "stop", id="stop-wrong-type"),
    pytest.param(_chat_body(logprobs=True), "logprobs", id="logprobs"),
    pytest.param(
        _chat_body(stream_options={"include_usage": "x"}),
        "stream_options.include_usage",
        id="bad-stream-options",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("body", "param"), INVALID_CHAT)
def test_invalid_chat_request_is_400_naming_the_field(served, http, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = http.post(served.api_url + "/chat/completions", content=content)
    _assert_error(response, 400, param)


INVALID_COMPLETION = [
    pytest.param({"prompt": ""}, id="empty-text"),
    pytest.param({"prompt": []}, id="empty-list"),
    pytest.param({"prompt": [[]]}, id="empty-token-list"),
    pytest.param({"prompt": [1, 2, 10**9]}, id="token-outside-vocab"),
    pytest.param({"prompt": [1, -2]}, id="negative-token"),
    pytest.param({"prompt": ["a", "b"]}, id="batched-prompts"),
    pytest.param({"prompt": [1, "a"]}, id="mixed-prompt"),
    pytest.param({"prompt": {"text": "a"}}, id="prompt-object"),
    pytest.param({"prompt": "hi", "echo": True}, id="echo"),
    pytest.param({"prompt": "hi", "suffix": "x"}, id="suffix"),
    pytest.param({}, id="missing-prompt"),
]


@pytest.mark.parametrize("body", INVALID_COMPLETION)
def test_invalid_completion_request_is_400(served, http, body):
    _assert_error(http.post(served.api_url + "/completions", json=body), 400)


def test_prompt_plus_max_tokens_over_max_model_len_is_400_with_token_counts(served, http):
    body = _chat_body(max_tokens=MAX_MODEL_LEN)
    error = _assert_error(http.post(served.api_url + "/chat/completions", json=body), 400)
    assert str(MAX_MODEL_LEN) in error["message"] and "tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"
    body = {"prompt": list(range(MAX_MODEL_LEN)), "max_tokens": 1}
    error = _assert_error(http.post(served.api_url + "/completions", json=body), 400)
    assert f"prompt ({MAX_MODEL_LEN} tokens)" in error["message"]


def test_prompt_filling_the_context_without_max_tokens_is_400(served, http):
    body = {"messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}]}
    error = _assert_error(http.post(served.api_url + "/chat/completions", json=body), 400)
    assert "tokens" in error["message"]


def test_unknown_model_is_404(served, http):
    response = http.post(served.api_url + "/chat/completions", json=_chat_body(model="gpt-9"))
    assert _assert_error(response, 404, "model")["code"] == "model_not_found"
    client = openai.OpenAI(base_url=served.api_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)


def test_unknown_route_and_wrong_method_get_error_bodies(served, http):
    _assert_error(http.get(served.api_url + "/nothing-here"), 404)
    _assert_error(http.get(served.api_url + "/chat/completions"), 405)


def test_oversized_body_is_413(served, http):
    body = json.dumps(_chat_body(messages=[{"role": "user", "content": "x" * MAX_BODY}]))
    _assert_error(http.post(served.api_url + "/chat/completions", content=body), 413)


def test_request_beyond_the_queue_is_429(served, http):
    long = _chat_body(max_tokens=64, ignore_eos=True, stream=True)
    with (
        forward_gate(served.client),  # held before its forward pass, it cannot finish
        http.stream("POST", served.api_url + "/chat/completions", json=long) as running,
    ):
        assert running.status_code == 200
        lines = running.iter_lines()  # keep a reference: dropping it closes the stream
        next(lines)  # admitted and streaming: it holds the only place
        response = http.post(served.api_url + "/chat/completions", json=_chat_body())
        error = _assert_error(response, 429)
        assert error["type"] == "rate_limit_error" and response.headers["retry-after"]
        client = openai.OpenAI(base_url=served.api_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    served.wait_until_idle()
    ok = http.post(served.api_url + "/chat/completions", json=_chat_body())
    assert ok.status_code == 200


def test_no_api_key_needed_when_none_is_configured(served, http):
    response = http.post(served.api_url + "/chat/completions", json=_chat_body())
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_errors_change_no_engine_state(served, http):
    before = served.wait_until_idle()
    for body in (b"{", json.dumps(_chat_body(max_tokens=10**6)).encode()):
        http.post(served.api_url + "/chat/completions", content=body)
    after = served.wait_until_idle()
    assert after["query_tokens"] == before["query_tokens"]
    assert after["free_blocks"] == before["free_blocks"]


def test_a_dead_engine_gets_503s_not_500s(tiny_llama, http):
    with running_server(str(tiny_llama), engine_options={"kv_cache_tokens": 1024}) as server:

        def broken_step():
            raise RuntimeError("simulated engine failure")

        server.client.engine.core.step = broken_step  # the loop thread calls it next
        url = server.api_url + "/chat/completions"
        for stream in (False, False, True):
            error = _assert_error(http.post(url, json=_chat_body(stream=stream)), 503)
            assert error["type"] == "server_error" and "simulated" not in error["message"]
        _assert_error(http.get(server.url + "/health"), 503)
        assert http.get(server.url + "/metrics").status_code == 200
