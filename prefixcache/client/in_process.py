"""The in-process ``EngineClient``: an ``Engine`` stepped by its own loop thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from prefixcache.cache.events import CacheEventCallback
from prefixcache.cache.pins import PinHandle
from prefixcache.client.protocol import PrewarmResult
from prefixcache.engine.loop import EngineLoop
from prefixcache.engine.stats import EngineStats
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.processor import InputProcessor
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams
from prefixcache.sdk import Engine

_PREFILL_ONLY = SamplingParams(max_tokens=1)


class InProcessEngineClient:
    """Serves ``engine`` from a background loop thread; owns that thread.

    Cache control runs on the loop thread between steps, so it never races a step.
    """

    def __init__(self, engine: Engine, loop: EngineLoop | None = None) -> None:
        self.engine = engine
        self.loop = loop or EngineLoop(engine)

    @classmethod
    def start(cls, model: str, **options: Any) -> InProcessEngineClient:
        """Load ``model`` (``Engine.from_pretrained`` options) on a new thread and step
        it there. The thread that steps the engine is then the only one that has run
        its parallel CPU ops: stepping on another thread than the one that loaded the
        model made every decode step ~30% slower on CPU (each thread gets an OpenMP pool
        of its own; docs/perf/http_path.md). Raises what loading raised."""
        built: queue.Queue = queue.Queue(maxsize=1)

        def load_and_step() -> None:
            try:
                engine = Engine.from_pretrained(model, **options)
                loop = EngineLoop(engine, start=False)
            except BaseException as exc:  # raised again in the caller's thread
                built.put(exc)
                return
            built.put((engine, loop))
            loop.run()

        threading.Thread(target=load_and_step, name="prefixcache-engine", daemon=True).start()
        outcome = built.get()
        if isinstance(outcome, BaseException):
            raise outcome
        return cls(*outcome)

    @property
    def limits(self) -> EngineLimits:
        """What the engine accepts and runs with."""
        return self.engine.limits

    @property
    def inputs(self) -> InputProcessor:
        """The engine's input processor."""
        return self.engine.inputs

    @property
    def is_alive(self) -> bool:
        """False once the loop thread has died or was shut down."""
        return self.loop.is_alive

    def generate(
        self,
        prompt_ids: np.ndarray,
        params: SamplingParams,
        request_id: str | None = None,
        salt: str | None = None,
        *,
        final_only: bool = False,
    ) -> AsyncIterator[RequestDelta]:
        """Stream the deltas of validated prompt ids (see ``EngineLoop.generate``)."""
        return self.loop.generate(prompt_ids, params, request_id, salt, final_only=final_only)

    async def abort(self, request_id: str) -> None:
        """Abort a request wherever it is."""
        self.loop.abort(request_id)

    async def prewarm(
        self,
        prompt_ids: np.ndarray,
        *,
        pin: bool = False,
        ttl: float | None = None,
        salt: str | None = None,
    ) -> PrewarmResult:
        """Prefill as an ordinary one-token request (no other request's output is lost)."""
        if pin:
            await self.run(lambda e: e.control.check_pinnable(len(prompt_ids), ttl, salt))
        reused = 0
        async for delta in self.generate(prompt_ids, _PREFILL_ONLY, salt=salt):
            reused = delta.num_cached_tokens
        if not pin:
            cached = await self.run(lambda e: e.control.peek(prompt_ids, salt))
            return PrewarmResult(len(prompt_ids), cached, reused)
        handle = await self.pin(prompt_ids, salt, ttl)
        return PrewarmResult(
            len(prompt_ids), handle.num_cached_tokens, reused, handle.handle, handle.expires_at
        )

    async def pin(self, prompt_ids: np.ndarray, salt: str | None, ttl: float | None) -> PinHandle:
        """Pin the already cached prefix of ``prompt_ids``."""
        return await self.run(lambda e: e.control.pin(prompt_ids, salt, ttl))

    async def unpin(self, handle: str) -> bool:
        """Release a pin; False when it is unknown or expired."""
        return await self.run(lambda e: e.control.unpin(handle))

    async def flush(self, tenant: str | None = None) -> int:
        """Drop every cached entry no request or pin holds (only ``tenant``'s when
        given); returns the blocks freed."""
        return await self.run(lambda e: e.control.flush(tenant))

    async def cache_info(self) -> EngineStats:
        """One snapshot of the engine's and the tiers' counters."""
        return await self.run(lambda e: e.core.snapshot())

    def subscribe_cache_events(self, callback: CacheEventCallback) -> Callable[[], None]:
        """Call ``callback(events)`` on the engine's thread with each batch of chunk events
        (see ``ChunkEvent``); returns a function that unsubscribes."""
        return self.engine.core.subscribe_cache_events(callback)

    async def run(self, fn: Callable[[Engine], Any]) -> Any:
        """``fn(engine)`` on the loop thread (tests and in-process tools inspect it so)."""
        return await self.loop.call(fn)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the loop thread has stopped (died or shut down); False on timeout."""
        return self.loop.wait_stopped(timeout)

    def shutdown(self) -> None:
        """Stop the loop thread; pending requests fail with ``EngineDeadError``."""
        self.loop.shutdown()
