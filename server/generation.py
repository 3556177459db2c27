"""Running a prepared request on the engine: metrics, usage counts, client disconnects.

Leaving ``tracked`` early (a client gone, a cancelled task) closes the engine stream,
which aborts the request and frees its blocks; that is the only cleanup needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from prefixcache.client import RequestDelta, RequestTimings
from server.chat_protocol import PromptTokensDetails, Timings, Usage
from server.errors import engine_error
from server.prepare import Prepared
from server.state import ServerState

T = TypeVar("T")
logger = logging.getLogger(__name__)


CLIENT_GONE = 499  # the status logged for a request whose client hung up (nginx's)


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


TIMINGS_REQUEST_HEADER = "x-prefixcache-timings"


@dataclass(slots=True)
class Tally:
    """What a request has produced so far: its text and the counts for ``usage``."""

    num_prompt_tokens: int
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    prepared: Prepared | None = None
    engine_timings: RequestTimings | None = None

    @classmethod
    def of(cls, prepared: Prepared) -> Tally:
        """An empty tally for ``prepared``."""
        return cls(len(prepared.prompt_ids), prepared=prepared)

    def add(self, delta: RequestDelta) -> None:
        """Account for one engine delta."""
        self.engine_timings = delta.timings or self.engine_timings
        self.num_cached_tokens = delta.num_cached_tokens
        self.num_output_tokens += len(delta.token_ids)
        self.text += delta.text
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def usage(self) -> Usage:
        """OpenAI's usage block, with the prompt tokens served from the prefix cache."""
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_output_tokens,
            total_tokens=self.num_prompt_tokens + self.num_output_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens),
            timings=self.timings(),
        )

    def stage_seconds(self) -> dict[str, float] | None:
        """Seconds per stage, once the engine has reported its own timings (else None)."""
        if self.engine_timings is None or self.prepared is None:
            return None
        return stage_seconds(self.prepared, self.engine_timings)

    def server_timing(self) -> str | None:
        """The stages as an HTTP ``Server-Timing`` header value (milliseconds)."""
        stages = self.stage_seconds()
        if stages is None:
            return None
        return ", ".join(f"{name};dur={1000 * value:.3f}" for name, value in stages.items())

    def timings(self) -> Timings | None:
        """Server-side stage timings, once the engine has reported its own (else None)."""
        engine, prepared = self.engine_timings, self.prepared
        if engine is None or prepared is None:
            return None
        server = prepared.decode_s + prepared.tokenize_s
        ttft = server + engine.queued + engine.lookup + engine.prefill
        return Timings(
            request_decode_ms=1000 * prepared.decode_s,
            tokenize_ms=1000 * prepared.tokenize_s,
            queue_ms=1000 * engine.queued,
            lookup_ms=1000 * engine.lookup,
            prefill_ms=1000 * engine.prefill,
            ttft_ms=1000 * ttft,
            total_ms=1000 * (ttft + engine.decode),
        )


async def tracked(
    state: ServerState, prepared: Prepared, final_only: bool = False
) -> AsyncIterator[RequestDelta]:
    """The engine's deltas for ``prepared``, recording tokens, TTFT, latency and outcome.

    ``final_only``: one delta with the whole output (a reply sent in one body), so the
    front does no work per step for it. Raises ``EngineDeadError`` if the engine has
    stopped.
    """
    metrics = state.metrics
    metrics.prompt_tokens.inc(len(prepared.prompt_ids))
    outcome, first = "abort", True
    stream = state.client.generate(
        prepared.prompt_ids,
        prepared.params,
        request_id=prepared.request_id,
        salt=prepared.salt,
        final_only=final_only,
    )
    try:
        async with contextlib.aclosing(stream) as deltas:
            async for delta in deltas:
                if first:
                    metrics.ttft.observe(_ttft(prepared, delta, final_only))
                    first = False
                metrics.generation_tokens.inc(len(delta.token_ids))
                if delta.finish_reason is not None:
                    outcome = delta.finish_reason
                    metrics.cached_prompt_tokens.inc(delta.num_cached_tokens)
                    metrics.e2e.observe(time.perf_counter() - prepared.arrival)
                    if delta.timings is not None:
                        metrics.record_stages(stage_seconds(prepared, delta.timings))
                yield delta
    except Exception:
        outcome = "error"
        raise
    finally:
        metrics.requests.labels(outcome).inc()


def _ttft(prepared: Prepared, delta: RequestDelta, final_only: bool) -> float:
    """Seconds from arrival to the first token. A folded delta arrives at the end: its
    first token came the engine's decode time earlier."""
    elapsed = time.perf_counter() - prepared.arrival
    if final_only and delta.timings is not None:
        return max(elapsed - delta.timings.decode, 0.0)
    return elapsed


def stage_seconds(prepared: Prepared, engine: RequestTimings) -> dict[str, float]:
    """A request's seconds per stage: the server's own, then the engine's."""
    return {
        "request_decode": prepared.decode_s,
        "tokenize": prepared.tokenize_s,
        "queue": engine.queued,
        "lookup": engine.lookup,
        "prefill": engine.prefill,
        "decode": engine.decode,
    }


def timing_header(request: Request, tally: Tally) -> dict[str, str]:
    """``Server-Timing`` for a non-streamed answer whose request asked for it with
    ``X-Prefixcache-Timings: 1`` (streams report timings in their usage chunk)."""
    if request.headers.get(TIMINGS_REQUEST_HEADER, "").lower() not in ("1", "true", "yes"):
        return {}
    value = tally.server_timing()
    return {"Server-Timing": value} if value else {}


async def collect(state: ServerState, prepared: Prepared) -> Tally:
    """Run ``prepared`` to the end and return its text and counts (the engine hands
    over the finishing delta only: nothing here runs per step)."""
    tally = Tally.of(prepared)
    async with contextlib.aclosing(tracked(state, prepared, final_only=True)) as deltas:
        async for delta in deltas:
            tally.add(delta)
    return tally


async def answer(request: Request, state: ServerState, prepared: Prepared) -> Tally | None:
    """Run ``prepared`` for a non-streamed reply: its tally, or None when the client hung
    up first (answer with ``CLIENT_GONE``). Engine failures become HTTP errors."""
    try:
        return await unless_disconnected(request, collect(state, prepared))
    except ClientGone:
        return None
    except Exception as exc:  # a dead engine, or a refusal by the engine itself
        raise engine_error(exc) from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client hangs up first, cancel it and raise ``ClientGone``.

    Starlette does not cancel a plain (non-streaming) endpoint when its client goes,
    so without this a dropped request would run to its last token.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the task's cleanup (closing the engine stream) run before going on.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message is the disconnect, whenever it comes.
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # cannot watch this connection: never report it gone
        logger.debug("cannot watch for a disconnect", exc_info=True)
        await asyncio.Event().wait()
