"""The replica deployment: one engine behind ``EngineClient``, taking token ids.

Ray Serve runs ``EngineReplica`` as the replicas of a deployment; the ingress reaches
them through a ``DeploymentHandle`` (``RemoteEngineClient``). Every method takes and
returns plain values (numpy ids, ``SamplingParams``, named tuples), so nothing of an
engine crosses a process. Pin handles are prefixed with the replica's id, so an unpin
finds the replica that holds the pin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from prefixcache.cache.pins import PinHandle
from prefixcache.client import InProcessEngineClient, PrewarmResult
from prefixcache.cluster.events import REPORT_KEY, CacheEventLog
from prefixcache.engine.stats import EngineStats
from prefixcache.inputs.limits import EngineLimits
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams

PIN_SEPARATOR = "/"


def replica_id() -> str:
    """This Serve replica's unique id (the key routers know it by)."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


class EngineReplica:
    """One engine, loaded from ``engine_options`` (``Engine.from_pretrained``'s arguments).

    Publishes its cache events to the routers through ``record_routing_stats``.
    """

    def __init__(self, engine_options: dict[str, Any]) -> None:
        options = dict(engine_options)
        self.client = InProcessEngineClient.start(options.pop("model"), **options)
        self.replica_id = replica_id()
        self.events = CacheEventLog()
        self._unsubscribe = self.client.subscribe_cache_events(self.events.add)
        self.num_requests = 0

    def limits(self) -> EngineLimits:
        """What the engine accepts and runs with."""
        return self.client.limits

    def whoami(self, replica: str | None = None) -> tuple[str, str]:
        """This replica's id and its Ray actor name (``ray.get_actor(name, "serve")``)."""
        import ray

        return self.replica_id, ray.get_runtime_context().get_actor_name()

    async def generate(
        self,
        prompt_ids: np.ndarray,
        params: SamplingParams,
        request_id: str | None = None,
        salt: str | None = None,
        replica: str | None = None,
        final_only: bool = False,
    ) -> AsyncIterator[RequestDelta]:
        """Stream the deltas of validated ids; the caller cancelling aborts the request.

        ``replica`` is read by the router only (a request for one replica);
        ``final_only``: the finishing delta only (see ``EngineClient.generate``).
        """
        self.num_requests += 1
        stream = self.client.generate(prompt_ids, params, request_id, salt, final_only=final_only)
        async for delta in stream:
            yield delta

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        """Abort a request if this replica runs it."""
        await self.client.abort(request_id)

    async def prewarm(
        self,
        prompt_ids: np.ndarray,
        pin: bool = False,
        ttl: float | None = None,
        salt: str | None = None,
        replica: str | None = None,
    ) -> PrewarmResult:
        """Prefill (and maybe pin) the prefix; the pin handle names this replica."""
        result = await self.client.prewarm(prompt_ids, pin=pin, ttl=ttl, salt=salt)
        if result.handle is None:
            return result
        return result._replace(handle=self._named(result.handle))

    async def pin(
        self, prompt_ids: np.ndarray, salt: str | None = None, ttl: float | None = None
    ) -> PinHandle:
        """Pin the cached prefix here; the handle names this replica."""
        handle = await self.client.pin(prompt_ids, salt, ttl)
        if handle.handle is None:
            return handle
        return dataclasses.replace(handle, handle=self._named(handle.handle))

    async def unpin(self, handle: str, replica: str | None = None) -> bool:
        """Release a pin made here (``handle`` without the replica prefix)."""
        return await self.client.unpin(handle)

    async def flush(self, tenant: str | None = None, replica: str | None = None) -> int:
        """Drop what no request or pin holds (only ``tenant``'s when given)."""
        return await self.client.flush(tenant)

    async def cache_info(self, replica: str | None = None) -> EngineStats:
        """This engine's counters."""
        return await self.client.cache_info()

    async def peek(
        self, prompt_ids: np.ndarray, salt: str | None = None, replica: str | None = None
    ) -> int:
        """Leading tokens of ``prompt_ids`` this replica's device cache holds (no lookup
        counted, nothing locked)."""
        return await self.client.run(lambda e: e.control.peek(prompt_ids, salt))

    async def load(self, replica: str | None = None) -> dict[str, Any]:
        """This replica's id, the requests it was sent and the prompt tokens it looked up."""
        stats = await self.client.cache_info()
        return {
            "replica": self.replica_id,
            "requests": self.num_requests,
            "prompt_tokens": stats.query_tokens,
            "cached_tokens": sum(t.hit_tokens for t in stats.tiers),
        }

    def is_alive(self) -> bool:
        """Whether the engine loop still runs."""
        return self.client.is_alive

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine died is replaced."""
        if not self.client.is_alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine loop stopped")

    def record_replica_metadata(self) -> dict[str, Any]:
        """What routers need to key requests as this replica's cache does."""
        limits = self.client.limits
        return {"fingerprint": limits.fingerprint, "chunk_size": limits.chunk_size}

    def record_routing_stats(self) -> dict[str, Any]:
        """What routers learn of this replica: its recent cache events."""
        return {REPORT_KEY: self.events.report()}

    def _named(self, handle: str) -> str:
        return f"{self.replica_id}{PIN_SEPARATOR}{handle}"

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.shutdown()
