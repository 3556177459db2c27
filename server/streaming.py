"""Server-sent events: ``data: {chunk}`` per new piece of text, then ``data: [DONE]``.

When the client disconnects, Starlette cancels the body iterator; closing it closes
the engine stream beneath, which aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import anyio
import msgspec
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from prefixcache.client import RequestDelta
from server.chat_format import ChatFormat, CompletionFormat
from server.chat_protocol import encode
from server.errors import APIError, engine_error, error_body
from server.generation import Tally
from server.prepare import Prepared

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(chunk: msgspec.Struct) -> bytes:
    """One event carrying ``chunk`` as JSON."""
    return b"data: " + encode(chunk) + b"\n\n"


async def events(
    deltas: AsyncIterator[RequestDelta],
    fmt: ChatFormat | CompletionFormat,
    prepared: Prepared,
) -> AsyncIterator[bytes]:
    """The event stream of one request, ending with ``[DONE]`` (after an error event
    if the engine died mid-stream)."""
    tally = Tally.of(prepared)
    first = fmt.first_chunk()
    if first is not None:
        yield sse(first)
    try:
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                tally.add(delta)
                if delta.text:
                    for chunk in fmt.text_chunks(delta.text):
                        yield sse(chunk)
                if delta.finish_reason is not None:
                    for chunk in fmt.finish_chunks(delta.finish_reason):
                        yield sse(chunk)
    except Exception as exc:  # headers are sent: report in-band, then end the stream
        yield _error_event(fmt.id, exc)
        yield DONE
        return
    if prepared.include_usage:
        yield sse(fmt.usage_chunk(tally.usage()))
    yield DONE


def _error_event(request_id: str, exc: Exception) -> bytes:
    """The error event for ``exc``: the body a non-streamed request would get."""
    try:
        error = engine_error(exc)
    except Exception:  # not an engine failure: a bug, whose details stay in the log
        logger.error("stream %s failed", request_id, exc_info=exc)
        error = APIError(500, "internal server error; see the server log")
    else:
        logger.error("stream %s failed: %s", request_id, error.message)
    return b"data: " + error.body() + b"\n\n"


SHUTDOWN_MESSAGE = "the server is shutting down; the stream was ended before it finished"


def shutdown_tail() -> bytes:
    """What a chat or completion stream cut by a shutdown ends with."""
    return b"data: " + error_body(503, SHUTDOWN_MESSAGE, code="server_shutdown") + b"\n\n" + DONE


class SSEResponse(StreamingResponse):
    """An event stream that stops as soon as its client disconnects, and then, however
    it ended, closes its source and calls ``on_close``.

    The disconnect watch is done here for every ASGI version: with spec 2.4 servers,
    Starlette would otherwise notice a gone client only when a write fails, and
    uvicorn drops writes to closed connections silently, so the request would run to
    its last token. Closing the source matters when the client goes before the first
    event: it was never started, so nothing else would run ``on_close`` (which gives
    back the request's admission place).

    When ``cut`` is set (a shutdown whose drain ran out of time) the stream stops
    where it is and sends ``tail`` (an error event and, for chat, ``[DONE]``) instead
    of the rest, so that no client is left with a stream that just breaks off.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        cut: asyncio.Event | None = None,
        tail: bytes = b"",
    ) -> None:
        super().__init__(content, headers=_HEADERS)
        self._source = content
        self._on_close = on_close
        self._cut = cut
        self._tail = tail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the events until done, disconnected or cut; then clean up."""
        ended, started = False, False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    nonlocal ended
                    with contextlib.suppress(OSError):  # a failed write: the client is gone
                        await self.stream_response(send_tracked)
                    ended = True
                    tasks.cancel_scope.cancel()

                async def watch_cut() -> None:
                    await self._cut.wait()
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                if self._cut is not None:
                    tasks.start_soon(watch_cut)
                await self.listen_for_disconnect(receive)
                ended = True  # the client is gone: nothing more to send
                tasks.cancel_scope.cancel()
            if not ended and self._cut is not None and self._cut.is_set():
                await self._send_tail(send, started)
        finally:
            try:
                await self._source.aclose()
            finally:
                self._on_close()

    async def _send_tail(self, send: Send, started: bool) -> None:
        with contextlib.suppress(OSError):
            if not started:
                start = {"status": self.status_code, "headers": self.raw_headers}
                await send({"type": "http.response.start", **start})
            await send({"type": "http.response.body", "body": self._tail, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
