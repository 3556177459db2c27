"""Graceful shutdown: on SIGTERM/SIGINT the server stops admitting (503 + Retry-After),
lets running streams finish up to ``--shutdown-timeout``, then ends each remaining
stream with an error event and ``[DONE]``, and exits."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from prefixcache import Engine
from prefixcache.client import InProcessEngineClient
from server.app import create_app
from server.background import BackgroundServer
from server.launch import DrainingServer
from tests.engine_hooks import forward_gate
from tests.server_harness import serve_subprocess, wait_for_url
from tests.test_server_cli import SMALL

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}


# Long enough that no request ever needs it; a test that wants the cut ends the drain's
# time itself (``_time_runs_out``), so no outcome depends on how fast the machine is.
DRAIN_TIMEOUT_S = 600.0


@pytest.fixture
def draining(tiny_llama):
    """A server whose drain gives running requests ``DRAIN_TIMEOUT_S``; its engine client."""
    engine = Engine.from_pretrained(str(tiny_llama), device="cpu", max_model_len=512)
    client = InProcessEngineClient(engine)
    app = create_app(client, model_name="tiny", shutdown_timeout=DRAIN_TIMEOUT_S)
    server = BackgroundServer(app, server_class=DrainingServer).start()
    try:
        yield server, client
    finally:
        server.stop()
        client.shutdown()


def _time_runs_out(server) -> None:
    """The drain's time is up now: the server's next tick cuts the streams still open."""
    server.server.drain.deadline = time.monotonic()


def _events(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_drain_refuses_new_requests_and_ends_a_held_stream_with_an_error_and_done(draining):
    server, client = draining
    with forward_gate(client) as gate, httpx.Client(trust_env=False, timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=CHAT) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"]
            gate.wait_until_held()  # the request is running, held before its forward pass
            server.server.handle_exit(signal.SIGTERM, None)

            refused = http.post(server.url + "/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            assert refused.json()["error"]["code"] == "draining"
            health = http.get(server.url + "/health")
            assert health.status_code == 503 and "draining" in health.text

            _time_runs_out(server)  # with the engine still held
            rest = _events(lines)
        *_, error, done = rest
        assert json.loads(error)["error"]["code"] == "server_shutdown"
        assert done == "[DONE]"
    server.join(timeout=30)
    assert not server.running


def test_drain_ends_a_held_responses_stream_with_an_error_event(draining):
    server, client = draining
    body = {"input": "hi", "max_output_tokens": 8, "stream": True}
    with (
        forward_gate(client) as gate,
        httpx.Client(trust_env=False, timeout=60) as http,
        http.stream("POST", server.url + "/v1/responses", json=body) as stream,
    ):
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # response.created
        gate.wait_until_held()
        server.server.handle_exit(signal.SIGTERM, None)
        _time_runs_out(server)
        rest = _events(lines)
    last = json.loads(rest[-1])
    assert last["type"] == "error" and last["code"] == "server_shutdown"
    server.join(timeout=30)
    assert not server.running


def test_drain_lets_a_stream_that_finishes_in_time_end_normally(draining):
    server, _ = draining
    with (
        httpx.Client(trust_env=False, timeout=60) as http,
        http.stream("POST", server.url + "/v1/chat/completions", json=CHAT) as stream,
    ):
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        server.server.handle_exit(signal.SIGTERM, None)
        rest = _events(lines)
    assert rest[-1] == "[DONE]"
    assert all("error" not in json.loads(event) for event in rest[:-1])
    server.join(timeout=30)
    assert not server.running


def test_sigterm_drains_the_serve_process_and_it_exits_cleanly(tiny_llama):
    flags = ["--log-level", "warning", "--shutdown-timeout", "0"]
    proc, lines = serve_subprocess("--model", str(tiny_llama), *SMALL, *flags)
    body = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        api = wait_for_url(lines, timeout=120)
        with (
            httpx.Client(trust_env=False, timeout=60) as http,
            http.stream("POST", api + "/completions", json=body) as stream,
        ):
            events = stream.iter_lines()
            next(line for line in events if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = _events(events)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # With no time to finish, the stream is cut: an error event, then [DONE] (or, had
    # it finished in the tick before the cut, its last chunk and [DONE]).
    assert rest[-1] == "[DONE]"
    if len(rest) > 1 and "error" in json.loads(rest[-2]):
        assert json.loads(rest[-2])["error"]["code"] == "server_shutdown"
