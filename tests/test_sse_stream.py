"""``server/streaming.py`` without HTTP: the event stream of a request, and
``SSEResponse`` driven as an ASGI app by a test that plays the server's part.

The engine's side is a real async generator of ``RequestDelta``; the ASGI side is the
``receive``/``send`` pair a server hands an app. Every step is synchronised on events
the code under test produces (a message sent, a generator closed), never on time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import numpy as np
import pytest

from prefixcache import SamplingParams
from prefixcache.client import RequestDelta
from prefixcache.engine.errors import EngineDeadError, RequestFailedError
from server.chat_format import ChatFormat, CompletionFormat
from server.prepare import Prepared
from server.streaming import DONE, SHUTDOWN_MESSAGE, SSEResponse, events, shutdown_tail

LOGGER = "server.streaming"


@dataclass
class Identity:
    """The two fields of the server's state that a format repeats in every chunk."""

    model_name: str = "tiny"
    fingerprint: str = "fp_0123456789ab"


def _prepared(include_usage: bool = False, prompt: int = 7) -> Prepared:
    return Prepared(
        request_id="chatcmpl-test",
        prompt_ids=np.arange(prompt, dtype=np.int32),
        params=SamplingParams(max_tokens=8),
        salt=None,
        stream=True,
        include_usage=include_usage,
        arrival=0.0,
    )


def _delta(text: str, ids: list[int], finish: str | None = None, cached: int = 0):
    return RequestDelta("chatcmpl-test", ids, text, finish, 7, cached)


class Source:
    """An engine stream: yields its deltas, then raises ``fail`` if set; records
    whether it was closed."""

    def __init__(self, deltas: list[RequestDelta], fail: Exception | None = None) -> None:
        self.deltas, self.fail, self.closed = deltas, fail, False

    async def __call__(self):
        try:
            for delta in self.deltas:
                yield delta
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


def _collect(stream) -> list[bytes]:
    async def run():
        return [event async for event in stream]

    return asyncio.run(run())


def _data(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[6:-2])


REPLY = [_delta("Hel", [1, 2]), _delta("", [3]), _delta("lo", [4], "stop", cached=5)]


# -------------------------------------------------------------- events()


def test_a_chat_stream_opens_with_the_role_sends_each_text_then_the_finish_and_done():
    prepared = _prepared()
    fmt, source = ChatFormat(Identity(), prepared), Source(REPLY)
    out = _collect(events(source(), fmt, prepared))
    assert out[-1] == DONE == b"data: [DONE]\n\n"
    chunks = [_data(e) for e in out[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert {(c["id"], c["model"], c["system_fingerprint"]) for c in chunks} == {
        ("chatcmpl-test", "tiny", "fp_0123456789ab")
    }
    assert source.closed


def test_a_completion_stream_has_no_opening_chunk_and_no_usage_unless_asked():
    prepared = _prepared()
    fmt = CompletionFormat(Identity(), prepared)
    out = _collect(events(Source(REPLY)(), fmt, prepared))
    chunks = [_data(e) for e in out[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hel", "lo", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert out[-1] == DONE and all("usage" not in c or c["usage"] is None for c in chunks)


def test_usage_comes_last_before_done_with_prompt_output_and_cached_counts():
    prepared = _prepared(include_usage=True, prompt=7)
    fmt = ChatFormat(Identity(), prepared)
    out = _collect(events(Source(REPLY)(), fmt, prepared))
    assert out[-1] == DONE
    usage_chunk = _data(out[-2])
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (7, 4, 11)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 5
    assert _data(out[-3])["choices"][0]["finish_reason"] == "stop"


def _assert_error_then_done(out: list[bytes], status_type: str, message: str, code) -> None:
    assert out[-1] == DONE and DONE not in out[:-1]
    error = _data(out[-2])["error"]
    assert (error["type"], error["message"], error["code"]) == (status_type, message, code)


def test_an_engine_failure_mid_stream_ends_with_its_error_event_and_done(caplog):
    prepared = _prepared(include_usage=True)
    fmt = ChatFormat(Identity(), prepared)
    source = Source(REPLY[:2], fail=RequestFailedError("simulated step failure"))
    caplog.set_level(logging.ERROR, logger=LOGGER)
    out = _collect(events(source(), fmt, prepared))
    message = "the engine failed while running this request; see the server log"
    _assert_error_then_done(out, "server_error", message, "engine_error")
    assert [_data(e)["choices"][0]["delta"] for e in out[:-2]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
    ]  # no finish and no usage after the failure
    assert source.closed
    [record] = caplog.records
    assert record.getMessage() == f"stream chatcmpl-test failed: {message}"
    assert record.exc_info is None


def test_a_dead_engine_mid_stream_is_reported_as_a_503_error_event():
    prepared = _prepared()
    fmt = CompletionFormat(Identity(), prepared)
    out = _collect(events(Source(REPLY[:1], fail=EngineDeadError("gone"))(), fmt, prepared))
    message = "the engine has stopped; retry later"
    _assert_error_then_done(out, "server_error", message, "engine_dead")
    assert len(out) == 3


def test_a_bug_mid_stream_is_an_internal_error_whose_details_stay_in_the_log(caplog):
    prepared = _prepared()
    fmt = ChatFormat(Identity(), prepared)
    source = Source(REPLY[:1], fail=KeyError("secret detail"))
    caplog.set_level(logging.ERROR, logger=LOGGER)
    out = _collect(events(source(), fmt, prepared))
    message = "internal server error; see the server log"
    _assert_error_then_done(out, "server_error", message, None)
    assert b"secret" not in b"".join(out)
    [record] = caplog.records
    assert record.getMessage() == "stream chatcmpl-test failed"
    assert record.exc_info[1] is source.fail


def test_a_consumer_that_stops_early_closes_the_engine_stream():
    prepared = _prepared()
    fmt = CompletionFormat(Identity(), prepared)
    source = Source(REPLY)

    async def run():
        stream = events(source(), fmt, prepared)
        first = await anext(stream)
        await stream.aclose()
        return first

    assert _data(asyncio.run(run()))["choices"][0]["text"] == "Hel"
    assert source.closed


def test_shutdown_tail_is_a_503_error_event_then_done():
    tail = shutdown_tail()
    assert tail.endswith(b"\n\n" + DONE) and tail.count(b"\n\n") == 2
    error = _data(tail[: -len(DONE)])["error"]
    assert SHUTDOWN_MESSAGE == (
        "the server is shutting down; the stream was ended before it finished"
    )
    assert error == {
        "message": SHUTDOWN_MESSAGE,
        "type": "server_error",
        "param": None,
        "code": "server_shutdown",
    }


# ------------------------------------------------------- SSEResponse as ASGI

# Not a timing check: a response that never ends (a cut or a disconnect ignored) fails
# its test after this long instead of hanging the suite.
HANG_GUARD_S = 30.0
SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "POST"}
TAIL = b"data: tail\n\n"


class Client:
    """The server's side of one ASGI call: records what the app sends, and tells it
    the client disconnected when ``leave`` is set."""

    def __init__(self, leave_after_bodies: int | None = None) -> None:
        self.sent: list[dict] = []
        self.leave = asyncio.Event()
        self.leave_after_bodies = leave_after_bodies

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if self.leave_after_bodies is not None and len(self.bodies) >= self.leave_after_bodies:
            self.leave.set()

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]

    @property
    def more(self) -> list[bool]:
        return [m["more_body"] for m in self.sent if m["type"] == "http.response.body"]


class Events:
    """An event stream that yields ``first``, then waits for ``go`` before the rest
    (a request still generating); records that it started and that it was closed."""

    def __init__(self, first: list[bytes], rest: list[bytes] | None = None) -> None:
        self.first, self.rest = first, rest or []
        self.go, self.waiting = asyncio.Event(), asyncio.Event()
        self.started = self.closed = False

    async def __call__(self):
        self.started = True
        try:
            for event in self.first:
                yield event
            self.waiting.set()
            await self.go.wait()
            for event in self.rest:
                yield event
        finally:
            self.closed = True


def _run_response(body: Events, client: Client, cut=None, tail=TAIL, during=None) -> list:
    """Run the response to its end (``during`` runs alongside it); the ``on_close`` calls."""
    closes = []

    async def run():
        body.gen = body()
        response = SSEResponse(body.gen, lambda: closes.append(1), cut=cut, tail=tail)
        app = asyncio.ensure_future(response(SCOPE, client.receive, client.send))
        if during is not None:
            await during()
        await asyncio.wait_for(app, HANG_GUARD_S)

    asyncio.run(run())
    return closes


def _headers(client: Client) -> dict[bytes, bytes]:
    start = client.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    return dict(start["headers"])


def test_a_stream_that_ends_sends_every_event_then_closes_its_source_once():
    body, client = Events([b"data: 1\n\n"]), Client()
    body.go.set()
    body.rest = [b"data: 2\n\n", DONE]
    closes = _run_response(body, client)
    headers = _headers(client)
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert client.bodies == [b"data: 1\n\n", b"data: 2\n\n", DONE, b""]
    assert client.more == [True, True, True, False]
    assert body.closed and closes == [1]


def test_a_client_that_leaves_mid_stream_stops_it_and_closes_the_source():
    body, client = Events([b"data: 1\n\n"], [b"data: never\n\n"]), Client(leave_after_bodies=1)
    cut = asyncio.Event()
    closes = _run_response(body, client, cut=cut)
    assert client.bodies == [b"data: 1\n\n"]  # no tail: nobody is there to read it
    assert body.closed and closes == [1]


def test_a_client_that_leaves_before_the_first_event_still_closes_and_releases():
    body, client = Events([b"data: never\n\n"]), Client()
    send = client.send

    async def send_start_then_leave(message):
        await send(message)
        client.leave.set()  # the client goes while the headers are on their way
        await asyncio.Event().wait()

    client.send = send_start_then_leave
    closes = _run_response(body, client)
    assert [m["type"] for m in client.sent] == ["http.response.start"]
    assert not body.started and body.gen.ag_frame is None  # closed before it ever ran
    assert closes == [1]  # the admission place is given back all the same


def test_a_client_that_leaves_while_the_first_event_is_awaited_closes_the_source():
    body, client = Events([], [b"data: never\n\n"]), Client()

    async def leave_when_waiting():
        await body.waiting.wait()
        client.leave.set()

    closes = _run_response(body, client, during=leave_when_waiting)
    assert client.bodies == [] and body.closed and closes == [1]


def test_a_client_gone_when_writing_ends_the_stream_quietly():
    body, client = Events([b"data: 1\n\n"]), Client()

    async def failing_send(message):
        if message["type"] == "http.response.body":
            raise OSError("connection reset")
        client.sent.append(message)

    client.send = failing_send
    closes = _run_response(body, client, cut=asyncio.Event())
    assert client.bodies == [] and closes == [1] and body.closed


def test_a_shutdown_cut_mid_stream_sends_the_tail_instead_of_the_rest():
    body, client = Events([b"data: 1\n\n"], [b"data: never\n\n"]), Client()
    cut = asyncio.Event()

    async def cut_when_waiting():
        await body.waiting.wait()
        cut.set()

    closes = _run_response(body, client, cut=cut, during=cut_when_waiting)
    starts = [m for m in client.sent if m["type"] == "http.response.start"]
    assert len(starts) == 1 and client.sent[0] is starts[0]
    assert client.bodies == [b"data: 1\n\n", TAIL, b""]
    assert client.more == [True, True, False]
    assert body.closed and closes == [1]


def test_a_cut_without_a_tail_ends_the_stream_with_nothing_added():
    body, client = Events([b"data: 1\n\n"], [b"data: never\n\n"]), Client()
    cut = asyncio.Event()
    closes = []

    async def run():
        response = SSEResponse(body(), lambda: closes.append(1), cut=cut)
        app = asyncio.ensure_future(response(SCOPE, client.receive, client.send))
        await body.waiting.wait()
        cut.set()
        await asyncio.wait_for(app, HANG_GUARD_S)

    asyncio.run(run())
    assert client.bodies == [b"data: 1\n\n", b"", b""] and client.more == [True, True, False]
    assert body.closed and closes == [1]


def test_a_cut_as_the_stream_ends_adds_nothing_after_its_end():
    cut = asyncio.Event()

    class CutAtTheEnd(Events):
        async def __call__(self):
            yield b"data: 1\n\n"
            cut.set()  # the drain's time runs out as the last event goes
            yield DONE

    body, client = CutAtTheEnd([]), Client()
    closes = _run_response(body, client, cut=cut)
    assert client.bodies == [b"data: 1\n\n", DONE, b""] and client.more[-1] is False
    assert closes == [1]


def test_a_client_that_leaves_as_the_cut_comes_gets_no_tail():
    body, client = Events([b"data: 1\n\n"], [b"data: never\n\n"]), Client()
    cut = asyncio.Event()
    send = client.send

    async def leave_then_cut(message):
        await send(message)
        if message["type"] == "http.response.body":
            client.leave.set()  # the disconnect arrives first
            cut.set()

    client.send = leave_then_cut
    closes = _run_response(body, client, cut=cut)
    assert client.bodies == [b"data: 1\n\n"] and body.closed and closes == [1]


def test_a_cut_that_is_never_set_lets_the_stream_finish():
    body, client = Events([b"data: 1\n\n"], [DONE]), Client()
    body.go.set()
    closes = _run_response(body, client, cut=asyncio.Event())
    assert client.bodies == [b"data: 1\n\n", DONE, b""] and closes == [1]


def test_a_tail_before_any_event_opens_the_response_with_its_status_and_headers():
    client = Client()

    async def run():
        async def nothing():
            yield b""

        response = SSEResponse(nothing(), lambda: None, cut=asyncio.Event(), tail=TAIL)
        await response._send_tail(client.send, started=False)
        return response

    response = asyncio.run(run())
    assert client.sent[0] == {
        "type": "http.response.start",
        "status": 200,
        "headers": response.raw_headers,
    }
    assert client.sent[1:] == [
        {"type": "http.response.body", "body": TAIL, "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]


def test_a_tail_after_the_headers_sends_only_the_tail_and_the_end():
    client = Client()

    async def run():
        async def nothing():
            yield b""

        response = SSEResponse(nothing(), lambda: None, tail=TAIL)
        await response._send_tail(client.send, started=True)

    asyncio.run(run())
    assert [m["type"] for m in client.sent] == ["http.response.body"] * 2
    assert client.bodies == [TAIL, b""] and client.more == [True, False]


def test_a_tail_to_a_client_already_gone_is_dropped_quietly():
    async def run():
        async def nothing():
            yield b""

        async def gone(message):
            raise OSError("connection reset")

        response = SSEResponse(nothing(), lambda: None, tail=TAIL)
        await response._send_tail(gone, started=True)
        await response._send_tail(gone, started=False)

    asyncio.run(run())


def test_on_close_runs_even_when_closing_the_source_fails():
    calls = []

    class Failing:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise StopAsyncIteration

        async def aclose(self):
            calls.append("aclose")
            raise RuntimeError("close failed")

    client = Client()

    async def run():
        response = SSEResponse(Failing(), lambda: calls.append("on_close"))
        await response(SCOPE, client.receive, client.send)

    with pytest.raises(RuntimeError, match="close failed"):
        asyncio.run(run())
    assert calls == ["aclose", "on_close"]
