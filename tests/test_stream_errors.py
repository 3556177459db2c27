"""An engine failure after a stream has started ends the stream in-band, cleanly.

The headers and some text are already out, so no HTTP status can say what went wrong:
the stream must carry an error event and then end as the protocol says, not break off.
"""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
from engine_hooks import wrap_forward
from server_harness import running_server

FAIL_AT_FORWARD = 6  # prefill + 4 decode steps succeed: text is streamed before it fails
MESSAGES = [{"role": "user", "content": "Keep talking until something breaks."}]
GENERATION = {"max_tokens": 64, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def served(tiny_llama):
    """A server of its own: the failure kills its engine."""
    with running_server(str(tiny_llama), engine_options={"kv_cache_tokens": 2048}) as server:
        yield server


def _fail_forward_pass(server, n: int) -> None:
    """Make the engine's ``n``-th forward pass from now on raise."""
    calls = itertools.count(1)

    def wrapper(run):
        def failing(*args, **kwargs):
            if next(calls) == n:
                raise RuntimeError("simulated device failure")
            return run(*args, **kwargs)

        return failing

    wrap_forward(server.client, wrapper)


def _events(server, path: str, body: dict) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event, read to the end of the stream."""
    events, name = [], None
    with (
        httpx.Client(trust_env=False, timeout=60) as http,
        http.stream("POST", server.api_url + path, json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():  # raises if the stream breaks off
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, line.removeprefix("data: ")))
                name = None
    return events


def _assert_ends_with_engine_error_then_done(events: list[tuple[str | None, str]]) -> list:
    """The chunks before the error; checks the error event and ``[DONE]`` after it."""
    assert events[-1][1] == "[DONE]"
    error = json.loads(events[-2][1])["error"]
    assert error["type"] == "server_error" and error["message"]
    assert "simulated" not in error["message"]  # internals stay in the server log
    return [json.loads(data) for _, data in events[:-2]]


def test_chat_stream_failing_mid_way_ends_with_an_error_event_and_done(served):
    _fail_forward_pass(served, FAIL_AT_FORWARD)
    body = {"model": "tiny", "messages": MESSAGES, **GENERATION}
    chunks = _assert_ends_with_engine_error_then_done(_events(served, "/chat/completions", body))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = [c["choices"][0]["delta"].get("content") for c in chunks[1:]]
    assert text and all(text)  # text went out before the failure
    assert not any(c["choices"][0]["finish_reason"] for c in chunks)


def test_completion_stream_failing_mid_way_ends_with_an_error_event_and_done(served):
    _fail_forward_pass(served, FAIL_AT_FORWARD)
    body = {"model": "tiny", "prompt": list(range(40, 90)), **GENERATION}
    chunks = _assert_ends_with_engine_error_then_done(_events(served, "/completions", body))
    assert chunks and all(c["choices"][0]["text"] for c in chunks)
    assert not any(c["choices"][0]["finish_reason"] for c in chunks)


def test_response_stream_failing_mid_way_ends_with_an_error_event(served):
    _fail_forward_pass(served, FAIL_AT_FORWARD)
    body = {"model": "tiny", "input": MESSAGES[0]["content"], "max_output_tokens": 64}
    events = _events(served, "/responses", {**body, "temperature": 0})
    names = [name for name, _ in events]
    assert names[0] == "response.created" and "response.output_text.delta" in names
    assert names[-1] == "error" and "response.completed" not in names
    error = json.loads(events[-1][1])
    # The step failed, not the engine: the error is this request's, not a dead engine.
    assert error["code"] == "engine_error" and "simulated" not in error["message"]
    assert error["sequence_number"] == len(events) - 1
