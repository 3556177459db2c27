"""``RemoteEngineClient``: the ``EngineClient`` of a deployment of engine replicas.

The ingress tokenizes and validates once, with its own ``InputProcessor`` built from
the replicas' limits, then forwards token ids through a Serve ``DeploymentHandle``;
the deployment's router (``PrefixAffinityRouter``) picks the replica. Generation
streams through Serve's streaming handles; leaving a stream early cancels it on the
replica, which aborts the request there.

A replica lost before a request's first delta is invisible to the caller: nothing was
answered yet, so the request is sent again (Serve routes it to a live replica). One
lost after that fails the request with ``ReplicaLostError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import RequestCancelledError

from prefixcache.cache.pins import PinHandle
from prefixcache.client.protocol import PrewarmResult
from prefixcache.cluster.registry import router_for
from prefixcache.cluster.replica import PIN_SEPARATOR
from prefixcache.cluster.stats import merge_stats
from prefixcache.engine.errors import EngineDeadError, ReplicaLostError
from prefixcache.engine.stats import EngineStats
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.processor import InputProcessor
from prefixcache.inputs.tokenizer import load_tokenizer
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams

MAX_RESENDS = 3  # replicas lost in a row before a request's first delta
_LOST = (RayActorError, ActorUnavailableError)


class RemoteEngineClient:
    """Serves a deployment of ``EngineReplica``s through ``handle`` as one engine.

    ``limits`` are the replicas' (all replicas run one configuration); ``model_folder``
    is where the ingress reads the tokenizer. Cache control with a
    ``PrefixAffinityRouter``: pins go where their prefix is cached, an unpin to the
    replica named in its handle, flush and stats to every replica (summed).
    """

    def __init__(self, handle: Any, limits: EngineLimits, model_folder: str | Path) -> None:
        self.handle = handle
        self._limits = limits
        self._inputs = InputProcessor(load_tokenizer(Path(model_folder)), limits)
        self._streams: dict[str, Any] = {}
        self._closed = False
        self.resends = 0  # requests sent again after losing a replica before any delta

    @classmethod
    async def connect(cls, handle: Any, model_folder: str | Path) -> RemoteEngineClient:
        """Ask a replica for the limits, then build the client."""
        limits = await handle.limits.remote()
        return cls(handle, limits, model_folder)

    @property
    def limits(self) -> EngineLimits:
        """What the replicas accept and run with."""
        return self._limits

    @property
    def inputs(self) -> InputProcessor:
        """Tokenizes and validates here, in the ingress, once per request."""
        return self._inputs

    @property
    def is_alive(self) -> bool:
        """True until shut down: Serve replaces a replica that dies."""
        return not self._closed

    async def generate(
        self,
        prompt_ids: np.ndarray,
        params: SamplingParams,
        request_id: str | None = None,
        salt: str | None = None,
        *,
        final_only: bool = False,
    ) -> AsyncIterator[RequestDelta]:
        """Stream the deltas from the replica the router picks (see the module doc);
        with ``final_only`` the replica sends the finishing delta only."""
        self._check_open()
        if request_id is not None and request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        for attempt in range(MAX_RESENDS + 1):
            answered = finished = False
            stream = self.handle.options(stream=True).generate.remote(
                prompt_ids=prompt_ids,
                params=params,
                request_id=request_id,
                salt=salt,
                final_only=final_only,
            )
            if request_id is not None:
                self._streams[request_id] = stream
            try:
                async for delta in _unwrapped(stream):
                    answered = True
                    finished = delta.finish_reason is not None
                    yield delta
                return
            except ReplicaLostError:
                if answered or attempt == MAX_RESENDS:
                    raise
                self.resends += 1
            finally:
                if request_id is not None:
                    self._streams.pop(request_id, None)
                if not finished:
                    stream.cancel()  # left early (or failed): abort it on the replica

    async def abort(self, request_id: str) -> None:
        """Cancel the request's stream; its replica aborts it."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    async def prewarm(
        self,
        prompt_ids: np.ndarray,
        *,
        pin: bool = False,
        ttl: float | None = None,
        salt: str | None = None,
    ) -> PrewarmResult:
        """Prefill on the replica the router picks for this prefix."""
        self._check_open()
        call = self.handle.prewarm.remote(prompt_ids=prompt_ids, pin=pin, ttl=ttl, salt=salt)
        return await _result(call)

    async def pin(self, prompt_ids: np.ndarray, salt: str | None, ttl: float | None) -> PinHandle:
        """Pin on the replica the router picks for this prefix (the one that holds it)."""
        self._check_open()
        return await _result(self.handle.pin.remote(prompt_ids=prompt_ids, salt=salt, ttl=ttl))

    async def unpin(self, handle: str) -> bool:
        """Release a pin on the replica its handle names; False if that one is gone."""
        replica, sep, local = handle.partition(PIN_SEPARATOR)
        if not sep or replica not in (self._replicas() or []):
            return False
        return await _result(self.handle.unpin.remote(local, replica=replica))

    async def flush(self, tenant: str | None = None) -> int:
        """Flush every replica; returns the blocks freed in all."""
        results = await self._each(lambda r: self.handle.flush.remote(tenant, replica=r))
        return sum(results)

    async def cache_info(self) -> EngineStats:
        """Every replica's counters, summed."""
        return merge_stats(await self._each(lambda r: self.handle.cache_info.remote(replica=r)))

    def shutdown(self) -> None:
        """Stop forwarding; the replicas belong to Serve."""
        self._closed = True
        for stream in list(self._streams.values()):
            stream.cancel()

    def routing_info(self) -> dict[str, Any] | None:
        """The router's view (``PrefixAffinityRouter.snapshot``); None without one."""
        router = router_for(self.handle.deployment_name, self.handle.app_name)
        return router.snapshot() if router is not None else None

    def _replicas(self) -> list[str] | None:
        router = router_for(self.handle.deployment_name, self.handle.app_name)
        return router.replica_ids() if router is not None else None

    async def _each(self, call: Callable[[str | None], Any]) -> list[Any]:
        """``call(replica)`` on every live replica (one picked by the router when the
        replicas are not known here)."""
        self._check_open()
        replicas = self._replicas() or [None]
        return list(await asyncio.gather(*(_result(call(r)) for r in replicas)))

    def _check_open(self) -> None:
        if self._closed:
            raise EngineDeadError("the client was shut down")


async def _unwrapped(stream: Any) -> AsyncIterator[RequestDelta]:
    """The stream's deltas, with Ray's wrapping of failures taken off."""
    try:
        async for delta in stream:
            yield delta
    except BaseException as exc:  # noqa: BLE001 - translated, then re-raised
        raise _translated(exc) from None


async def _result(response: Any) -> Any:
    try:
        return await response
    except BaseException as exc:  # noqa: BLE001 - translated, then re-raised
        raise _translated(exc) from None


def _translated(exc: BaseException) -> BaseException:
    """The engine's own error for a failure that crossed Ray (``ReplicaLostError`` for
    a replica gone or an engine stopped there)."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, Exception):
        exc = exc.cause
    if isinstance(exc, _LOST):
        return ReplicaLostError(_replica_name(exc), type(exc).__name__)
    if isinstance(exc, EngineDeadError):
        return ReplicaLostError("its engine", f"the engine stopped ({exc})")
    if isinstance(exc, RequestCancelledError):
        return asyncio.CancelledError()
    return exc


def _replica_name(exc: BaseException) -> str:
    actor_id = getattr(exc, "actor_id", None)
    return f"actor {actor_id}" if actor_id else "a replica"
