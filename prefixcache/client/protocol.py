"""``EngineClient``: everything a front (the HTTP server, a router) knows of an engine.

A front validates input with ``inputs`` (tokenizing and checking lengths once), then
talks to the engine only through these calls. In process the client wraps the engine
loop thread; a client may equally stand for an engine in another process or on
another machine, since nothing here hands out engine objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, Protocol

import numpy as np

from prefixcache.cache.events import CacheEventCallback
from prefixcache.cache.pins import PinHandle
from prefixcache.engine.stats import EngineStats
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.processor import InputProcessor
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams


class PrewarmResult(NamedTuple):
    """A pre-warmed prefix: its size, what the cache holds of it, and its pin if any.

    ``num_reused_tokens`` were already cached before this prewarm; ``expires_at`` is
    Unix time (None: no deadline, or not pinned).
    """

    num_tokens: int
    num_cached_tokens: int
    num_reused_tokens: int
    handle: str | None = None
    expires_at: float | None = None

    @property
    def pinned(self) -> bool:
        """True when the prefix was pinned."""
        return self.handle is not None


class EngineClient(Protocol):
    """The typed async interface to one engine.

    Failures: ``ValueError`` for a request the engine refuses (a client's error;
    ``KVCacheExhaustedError`` when pins leave too little KV cache for it, which can
    come mid-stream since pins change at run time), ``RequestFailedError`` for a
    request the engine failed while running it (``KVCacheBusyError``: preempted too
    often) while it goes on serving others, ``EngineDeadError`` once the engine
    cannot serve any more.
    """

    @property
    def limits(self) -> EngineLimits:
        """What the engine accepts and runs with."""

    @property
    def inputs(self) -> InputProcessor:
        """Tokenizes and validates prompts for this engine (safe on any thread)."""

    @property
    def is_alive(self) -> bool:
        """False once the engine has stopped."""

    def generate(
        self,
        prompt_ids: np.ndarray,
        params: SamplingParams,
        request_id: str | None = None,
        salt: str | None = None,
        *,
        final_only: bool = False,
    ) -> AsyncIterator[RequestDelta]:
        """Stream the deltas of validated prompt ids; leaving early aborts the request.

        With ``final_only`` (a caller that answers with the whole output at once) the
        stream is one delta, the finishing one, holding every id, the whole text and
        every log-prob, as the deltas one by one would add up to (``FinalOnly``);
        the client does no per-step work on the caller's event loop for it.
        """

    async def abort(self, request_id: str) -> None:
        """Abort a request wherever it is."""

    async def prewarm(
        self,
        prompt_ids: np.ndarray,
        *,
        pin: bool = False,
        ttl: float | None = None,
        salt: str | None = None,
    ) -> PrewarmResult:
        """Prefill validated ids into the cache without a reply; with ``pin``, pin them
        (the pin cap is checked before any work)."""

    async def pin(self, prompt_ids: np.ndarray, salt: str | None, ttl: float | None) -> PinHandle:
        """Pin the already cached prefix of ``prompt_ids``."""

    async def unpin(self, handle: str) -> bool:
        """Release a pin; False when it is unknown or expired."""

    async def flush(self, tenant: str | None = None) -> int:
        """Drop every cached entry no request or pin holds; returns the blocks freed.

        With ``tenant``, only the entries of that tenant's salts: a salt
        ``TENANT:REST`` belongs to ``TENANT`` (``salt_tenant``), and pins are capped
        per tenant the same way.
        """

    async def cache_info(self) -> EngineStats:
        """Sizes and counters of the engine and every KV tier, as one snapshot."""

    def subscribe_cache_events(self, callback: CacheEventCallback) -> Callable[[], None]:
        """Call ``callback(events: list[ChunkEvent])`` with each batch of cache events
        (full chunks stored in the device cache, or evicted from the engine's last
        local tier; one batch per engine step); returns a function that unsubscribes.
        The callback runs on the engine's thread: it must be quick and not block."""

    def shutdown(self) -> None:
        """Stop the engine; pending requests fail with ``EngineDeadError``."""
