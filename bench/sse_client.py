"""A lean client for benchmarks: POST a JSON body, read server-sent events
(``post_events``) or one JSON answer (``post_json``).

The load generator shares the machine with the server it measures, so it should
spend as little CPU per event as it can: one connection per request, plain asyncio
streams, and no per-event machinery beyond splitting lines and parsing JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(RuntimeError):
    """The server answered with a status other than 200."""


async def post_json(url: str, path: str, payload: bytes) -> tuple[float, dict]:
    """POST ``payload`` (JSON bytes) to ``url + path`` for a non-streamed answer:
    (seconds from sending to the whole body read, the body parsed)."""
    async with _posted(url, path, payload, "application/json") as (reader, chunked, start):
        body = b"".join([data async for data in _body(reader, chunked)])
        return time.perf_counter() - start, json.loads(body)


async def post_events(url: str, path: str, payload: bytes) -> AsyncIterator[tuple[float, dict]]:
    """POST ``payload`` (JSON bytes) to ``url + path``; yield (seconds since sending,
    event) for each ``data: {...}`` event until the stream ends."""
    async with _posted(url, path, payload, "text/event-stream") as (reader, chunked, start):
        pending = b""
        async for data in _body(reader, chunked):
            pending += data
            *events, pending = pending.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data: {"):
                        yield time.perf_counter() - start, json.loads(line[6:])


@contextlib.asynccontextmanager
async def _posted(url: str, path: str, payload: bytes, accept: str):
    """One connection with the POST sent and the response head read: (reader, whether
    the body is chunked, when the request was sent)."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port, limit=1 << 22)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\n"
            f"Content-Type: application/json\r\nAccept: {accept}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        start = time.perf_counter()
        writer.write(head + payload)
        await writer.drain()
        yield reader, await _read_head(reader), start
    finally:
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> bool:
    """Read the status line and headers; True when the body is chunked."""
    status = (await reader.readline()).decode("latin-1").split()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if len(status) < 2 or status[1] != "200":
        body = await reader.read()
        raise HTTPStatusError(f"HTTP {' '.join(status[1:])}: {body[:500]!r}")
    return headers.get("transfer-encoding", "").lower() == "chunked"


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:
        while data := await reader.read(1 << 16):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]
