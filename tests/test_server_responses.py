"""The Responses API end to end: a real uvicorn server and the official openai client."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import pytest
from server_harness import running_server

from prefixcache import cli
from prefixcache.apps.response_store import ResponseStore
from prefixcache.client import InProcessEngineClient
from prefixcache.sdk import Engine
from server.app import create_app
from server.background import BackgroundServer
from server.responses_routes import install_response_store

BLOCK = 16
KEY_A, KEY_B = "key-a", "key-b"
STORY = "Tell me a long story about a server that remembered whole conversations. " * 3


@pytest.fixture(scope="module")
def served(tiny_llama):
    with running_server(
        str(tiny_llama),
        engine_options={"kv_cache_tokens": 8192, "max_model_len": 2048},
        api_keys=(KEY_A, KEY_B),
    ) as server:
        yield server


@contextlib.contextmanager
def _serving(model, store: ResponseStore):
    """A fresh server (engine and all) whose Responses API keeps its answers in ``store``."""
    options = {"kv_cache_tokens": 4096, "max_model_len": 2048}
    client = InProcessEngineClient(Engine.from_pretrained(str(model), device="cpu", **options))
    try:
        app = create_app(client, model_name="tiny")
        install_response_store(app, store)
        with BackgroundServer(app) as server:
            yield server.url + "/v1"
    finally:
        client.shutdown()


def _client(served, key: str = KEY_A) -> openai.OpenAI:
    return _client_at(served.api_url, key)


def _client_at(api_url: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=api_url,
        api_key=key,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=60),
    )


def _respond(client, text, previous=None, **kwargs):
    kwargs = {"max_output_tokens": 8, "temperature": 0, **kwargs}
    if previous is not None:
        kwargs["previous_response_id"] = previous
    return client.responses.create(model="tiny", input=text, **kwargs)


def _chat(client, messages) -> str:
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    return reply.choices[0].message.content


def test_three_turns_by_id_match_chat_completions_of_the_whole_conversation(served):
    client = _client(served)
    messages, previous = [], None
    for question in ("Three turns. " + STORY, "What happened next?", "How did it end?"):
        response = _respond(client, question, previous)
        messages.append({"role": "user", "content": question})
        assert response.output_text == _chat(client, messages)
        messages.append({"role": "assistant", "content": response.output_text})
        assert response.status in ("completed", "incomplete")
        previous = response.id


def test_turn_two_cached_tokens_cover_turn_one_prompt(served):
    client = _client(served)
    first = _respond(client, "Cached turns. " + STORY)
    assert first.usage.input_tokens_details.cached_tokens == 0
    second = _respond(client, "Go on.", first.id)
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= first.usage.input_tokens // BLOCK * BLOCK
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id


def test_streaming_sends_the_responses_events_and_can_be_continued(served):
    client = _client(served)
    events = list(_respond(client, "Streaming. " + STORY, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens > 0
    whole = _respond(client, "Streaming. " + STORY)
    assert whole.output_text == text
    second = _respond(client, "Next?", final.id, stream=True)
    done = [e for e in second if e.type == "response.completed"][0].response
    assert done.usage.input_tokens_details.cached_tokens >= BLOCK


def test_get_and_delete_a_stored_response(served):
    client = _client(served)
    response = _respond(client, "Stored. " + STORY)
    fetched = client.responses.retrieve(response.id)
    assert fetched.id == response.id and fetched.output_text == response.output_text
    assert fetched.usage.input_tokens == response.usage.input_tokens
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        _respond(client, "Next?", response.id)


def test_unknown_and_other_tenant_ids_answer_404_alike(served):
    response = _respond(_client(served), "Tenant A. " + STORY)
    other = _client(served, KEY_B)
    unknown = "resp_" + "0" * 32
    bodies = []
    for rid in (response.id, unknown):
        with pytest.raises(openai.NotFoundError) as caught:
            other.responses.retrieve(rid)
        bodies.append(caught.value.body)
        with pytest.raises(openai.NotFoundError):
            _respond(other, "Steal it.", rid)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(rid)
    assert [b["type"] for b in bodies] == ["not_found_error"] * 2
    assert bodies[0]["message"].replace(response.id, unknown) == bodies[1]["message"]
    assert _client(served).responses.retrieve(response.id).id == response.id


def test_store_false_is_not_kept(served):
    client = _client(served)
    response = _respond(client, "Not stored. " + STORY, store=False)
    assert response.output_text is not None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


@pytest.mark.parametrize(
    "body",
    [
        {"input": []},
        {"input": ""},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        {"input": [{"role": "wizard", "content": "hi"}]},
        {"input": "hi", "max_output_tokens": 0},
        {"input": "hi", "temperature": 5},
        {"input": "hi", "max_output_tokens": 10**6},
    ],
)
def test_bad_input_is_a_400_with_an_error_body(served, body):
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(trust_env=False, timeout=60, headers=headers) as http:
        response = http.post(served.api_url + "/responses", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_responses_schemas_are_in_the_openapi_document(served):
    with httpx.Client(trust_env=False, timeout=60) as http:
        doc = http.get(served.url + "/openapi.json").json()
    assert "ResponseRequest" in doc["components"]["schemas"]
    assert "/v1/responses/{response_id}" in doc["paths"]


@pytest.mark.parametrize("stream", [False, True])
def test_stage_timings_with_the_store_lookup_fit_inside_what_the_client_measured(served, stream):
    client = _client(served)
    first = _respond(client, "Timed. " + STORY)
    sent = time.perf_counter()
    second = _respond(client, "Next?", first.id, stream=stream)
    first_text_ms = None
    if stream:
        for event in second:
            if event.type == "response.output_text.delta" and first_text_ms is None:
                first_text_ms = 1000 * (time.perf_counter() - sent)
            if event.type == "response.completed":
                second = event.response
    done_ms = 1000 * (time.perf_counter() - sent)
    timings = second.usage.model_dump()["timings"]
    stages = ["request_decode_ms", "store_ms", "tokenize_ms", "queue_ms", "lookup_ms"]
    stages.append("prefill_ms")
    # tokenize_ms is reported net of the store lookup: negative if it were counted twice.
    assert min(timings[name] for name in stages) >= 0
    assert timings["ttft_ms"] <= timings["total_ms"] <= done_ms
    if stream:
        assert timings["ttft_ms"] <= first_text_ms


def test_a_conversation_continues_after_a_restart_on_the_same_folder(tiny_llama, tmp_path):
    question = "Restart. " + STORY
    with _serving(tiny_llama, ResponseStore(folder=tmp_path)) as url:
        first = _respond(_client_at(url), question)
    with _serving(tiny_llama, ResponseStore(folder=tmp_path)) as url:
        client = _client_at(url)
        second = _respond(client, "And then?", first.id)
        whole = client.chat.completions.create(
            model="tiny",
            messages=[
                {"role": "user", "content": question},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And then?"},
            ],
            max_tokens=8,
            temperature=0,
        )
        assert second.usage.input_tokens == whole.usage.prompt_tokens
        assert second.output_text == whole.choices[0].message.content
        assert client.responses.retrieve(first.id).output_text == first.output_text


def test_an_expired_id_answers_404_with_an_error_body(tiny_llama):
    now = [1_700_000_000.0]
    store = ResponseStore(ttl_s=60, clock=lambda: now[0])
    with _serving(tiny_llama, store) as url:
        client = _client_at(url)
        kept, expiring = (_respond(client, f"Expiry {i}. " + STORY) for i in range(2))
        now[0] += 59
        assert client.responses.retrieve(kept.id).id == kept.id
        now[0] += 1
        with pytest.raises(openai.NotFoundError) as caught:
            _respond(client, "Next?", expiring.id)
        assert caught.value.body["code"] == "not_found"
        assert caught.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(kept.id)
    assert len(store) == 0


def test_serve_responses_dir_flag_persists_the_store_there(monkeypatch, tiny_llama, tmp_path):
    apps = []

    class Recorder:  # stands in for the uvicorn server: keeps the app instead of serving it
        def __init__(self, config) -> None:
            self.config = config

        def run(self, sockets) -> None:
            apps.append(self.config.app)

    monkeypatch.setattr("server.launch.DrainingServer", Recorder)
    argv = ["serve", "--model", str(tiny_llama), "--device", "cpu", "--port", "0"]
    argv += ["--kv-cache-tokens", "4096", "--max-model-len", "512"]
    assert cli.main([*argv, "--responses-dir", str(tmp_path / "kept")]) == 0
    (app,) = apps
    assert (
        app.state.server.response_store.folder == tmp_path / "kept" and (tmp_path / "kept").is_dir()
    )


class _BrokenStore(ResponseStore):
    """A store whose writes fail, as a full disk would."""

    def put(self, entry) -> bool:
        raise OSError("no space left on device")


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(tiny_llama):
    body = {"model": "tiny", "input": "Failing. " + STORY, "stream": True, "max_output_tokens": 8}
    with (
        _serving(tiny_llama, _BrokenStore()) as url,
        httpx.Client(trust_env=False, timeout=60) as http,
        http.stream("POST", url + "/responses", json=body) as response,
    ):
        assert response.status_code == 200
        events = _events(response.iter_lines())
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "response.created" and kinds[-1] == "error"
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds
    error = events[-1][1]
    assert error["code"] == error["error"]["code"] == "server_error"
    assert error["sequence_number"] == len(events) - 1


def _events(lines) -> list[tuple[str, dict]]:
    """(event type, data) of each server-sent event; the two must agree."""
    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
            assert data["type"] == kind
            events.append((kind, data))
    return events
