"""``PrefixAffinityRouter``: Ray Serve's request router for prefixcache replicas.

A thin layer over ``AffinityIndex``: Serve calls ``choose_replicas`` for each request
to the replica deployment, and the index picks by exact chained chunk hashes. The
index is made once a replica reports its model fingerprint and chunk size (its
``record_replica_metadata``); it learns from every request routed
(``on_request_routed``) and from the cache events in each replica's routing stats
(``update_replicas``). Requests carrying ``replica=ID`` (unpin, flush, stats) go to
that replica.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from prefixcache.cluster import registry
from prefixcache.cluster.affinity import (
    DEFAULT_IMBALANCE_THRESHOLD,
    DEFAULT_MAX_CHAINS,
    AffinityIndex,
)
from prefixcache.cluster.events import REPORT_KEY, EventCursor

logger = logging.getLogger(__name__)
_MAX_PENDING_KEYS = 4096


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Routes to the replica holding the longest prefix of the request's chunk chains.

    Options (``request_router_kwargs``): ``imbalance_threshold`` (queued requests the
    best match may exceed the shortest queue by), ``max_chains`` (per replica).
    """

    def initialize_state(
        self,
        imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
        max_chains: int = DEFAULT_MAX_CHAINS,
    ) -> None:
        """Called by Serve with ``request_router_kwargs``."""
        self._options = {"imbalance_threshold": imbalance_threshold, "max_chains": max_chains}
        AffinityIndex("check", 1, **self._options)  # bad options fail here, at deploy time
        self.index: AffinityIndex | None = None
        self._cursor = EventCursor()
        # internal request id -> its chain hashes, from choosing until routed (bounded:
        # a request cancelled while waiting is never routed)
        self._keys: OrderedDict[str, list[int]] = OrderedDict()
        self.choices: dict[str, int] = {"affinity": 0, "imbalanced": 0, "balance": 0}
        registry.register(self._deployment_id.app_name, self._deployment_id.name, self)

    def replica_ids(self) -> list[str]:
        """The replicas it routes to now."""
        return [rid.unique_id for rid in self.curr_replicas]

    def snapshot(self) -> dict[str, Any]:
        """What it believes: chains held per replica, and its choices so far by reason."""
        index = self.index
        held = {rid.unique_id: index.held(rid) if index else 0 for rid in self.curr_replicas}
        return {"held_chains": held, "choices": dict(self.choices)}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new replica set (and their routing stats): apply their cache events."""
        super().update_replicas(replicas)
        for replica in replicas:
            self._ensure_index(replica)
        if self.index is None:
            return
        self.index.set_replicas(r.replica_id for r in replicas)
        for replica in replicas:
            report = (replica.routing_stats or {}).get(REPORT_KEY)
            if report is not None:
                self._cursor.apply(self.index, replica.replica_id, report)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica at once (Serve's replica update comes later)."""
        super().on_replica_actor_died(replica_id)
        if self.index is not None:
            self.index.set_replicas(self.curr_replicas)
        self._cursor.drop(replica_id)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The affinity choice first, the other candidates after it."""
        if not candidate_replicas:
            return []
        target = _target(pending_request)
        if target is not None:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [chosen] if chosen else [candidate_replicas]
        hashes = self._request_key(pending_request)
        if hashes is None or self.index is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        queue_lens = await self._queue_lens(candidate_replicas)
        choice = self.index.choose(hashes, queue_lens)
        self.choices[choice.reason] += 1
        by_id = {r.replica_id: r for r in candidate_replicas}
        rest = [r for rid, r in by_id.items() if rid != choice.replica]
        return [[by_id[choice.replica]], rest] if rest else [[by_id[choice.replica]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        """The replica will hold the request's prompt chains: learn them now."""
        hashes = self._keys.pop(pending_request.metadata.internal_request_id, None)
        if hashes and self.index is not None:
            self.index.stored(replica_id, hashes)

    def _request_key(self, pending_request: PendingRequest | None) -> list[int] | None:
        """The request's chain hashes (None: not a prompt request)."""
        if pending_request is None or self.index is None:
            return None
        request_id = pending_request.metadata.internal_request_id
        hashes = self._keys.get(request_id)
        if hashes is None:
            prompt_ids = pending_request.kwargs.get("prompt_ids")
            if prompt_ids is None:
                return None
            hashes = self.index.key(prompt_ids, pending_request.kwargs.get("salt"))
            self._keys[request_id] = hashes
            while len(self._keys) > _MAX_PENDING_KEYS:
                self._keys.popitem(last=False)
        return hashes

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Queue lengths from Serve's cache, probing the replicas it has none for."""
        lens: dict[ReplicaID, int] = {}
        missing = []
        for replica in replicas:
            cached = self.replica_queue_len_cache.get(replica.replica_id)
            if cached is None:
                missing.append(replica)
            else:
                lens[replica.replica_id] = cached
        if missing:
            for replica, queue_len in await self._probe_queue_lens(missing, 0):
                # An unanswered probe counts as full: it should not win on load.
                lens[replica.replica_id] = (
                    queue_len if queue_len is not None else replica.max_ongoing_requests
                )
        return lens

    def _ensure_index(self, replica: RunningReplica) -> None:
        if self.index is not None:
            return
        metadata = replica.replica_metadata or {}
        fingerprint, chunk_size = metadata.get("fingerprint"), metadata.get("chunk_size")
        if fingerprint and chunk_size:
            self.index = AffinityIndex(fingerprint, chunk_size, **self._options)


def _target(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    target: Any = pending_request.kwargs.get("replica")
    return target if isinstance(target, str) else None
