"""Server-sent events: ``data: {chunk}`` per new piece of text, then ``data: [DONE]``.

When the client disconnects, Starlette cancels the body iterator; closing it closes
the engine stream beneath, which aborts the request and frees its blocks.
"""

from __future__ import annotations

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
from server.errors import APIError, engine_error
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
                    yield sse(fmt.text_chunk(delta.text))
                if delta.finish_reason is not None:
                    yield sse(fmt.finish_chunk(delta.finish_reason))
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


class SSEResponse(StreamingResponse):
    """An event stream that stops as soon as its client disconnects, and then, however
    it ended, closes its source and calls ``on_close``.

    The disconnect watch is done here for every ASGI version: with spec 2.4 servers,
    Starlette would otherwise notice a gone client only when a write fails, and
    uvicorn drops writes to closed connections silently, so the request would run to
    its last token. Closing the source matters when the client goes before the first
    event: it was never started, so nothing else would run ``on_close`` (which gives
    back the request's admission place).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers=_HEADERS)
        self._source = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the events until done or disconnected; then clean up."""
        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # a failed write: the client is gone
                        await self.stream_response(send)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            try:
                await self._source.aclose()
            finally:
                self._on_close()
