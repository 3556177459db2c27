"""Cache events from a replica to the routers, through Ray Serve's routing stats.

A replica keeps its recent chunk events (``ChunkEvent``: chains stored, chains evicted
from every local tier) in a ``CacheEventLog`` numbered by sequence; Serve's controller
polls ``record_routing_stats`` and hands the latest report to every router, which may
skip reports in between. So each report carries the last events (bounded by a count
of hashes), and a router applies those past its cursor (``EventCursor``). When a
router's cursor fell out of the window it missed evictions, so it forgets what it
believed of that replica: a missed eviction must never keep attracting traffic.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Hashable, Iterable
from typing import Any

from prefixcache.cluster.affinity import AffinityIndex

DEFAULT_WINDOW_HASHES = 1 << 16  # ~0.5 MB of hashes per report
REPORT_KEY = "prefixcache_cache_events"


class CacheEventLog:
    """The recent cache events of one replica, numbered; safe to feed from any thread.

    ``add(events)`` takes what ``EngineClient.subscribe_cache_events`` publishes (any
    objects with ``kind`` and ``chunk_hashes``); ``report()`` is the window routers read.
    """

    def __init__(self, window_hashes: int = DEFAULT_WINDOW_HASHES) -> None:
        if not isinstance(window_hashes, int) or window_hashes <= 0:
            raise ValueError(f"window_hashes must be a positive integer, got {window_hashes!r}")
        self.window_hashes = window_hashes
        self.epoch = uuid.uuid4().hex  # a restarted log is never taken for this one
        self._events: deque[tuple[int, str, tuple[int, ...]]] = deque()
        self._num_hashes = 0
        self._next_seq = 0
        self._lock = threading.Lock()

    def add(self, events: Iterable[Any]) -> None:
        """Append a batch of chunk events (called on the engine's thread: only appends)."""
        with self._lock:
            for event in events:
                hashes = tuple(event.chunk_hashes)
                self._events.append((self._next_seq, event.kind, hashes))
                self._next_seq += 1
                self._num_hashes += len(hashes)
            # Keep at least the newest event, however large: dropping it would make
            # every router forget the replica on every report.
            while self._num_hashes > self.window_hashes and len(self._events) > 1:
                self._num_hashes -= len(self._events.popleft()[2])

    def report(self) -> dict[str, Any]:
        """The window: ``epoch``, ``next_seq`` and ``events`` as ``(seq, kind, hashes)``."""
        with self._lock:
            return {"epoch": self.epoch, "next_seq": self._next_seq, "events": list(self._events)}


class EventCursor:
    """Per replica, how far a router has applied that replica's events."""

    def __init__(self) -> None:
        self._seen: dict[Hashable, tuple[str, int]] = {}  # replica -> (epoch, next seq)

    def apply(self, index: AffinityIndex, replica: Hashable, report: dict[str, Any]) -> int:
        """Apply the events of ``report`` that ``replica`` sent past the cursor to
        ``index``; returns how many were applied. A gap (or a new epoch) first makes the
        index forget the replica."""
        epoch, next_seq, events = report["epoch"], report["next_seq"], report["events"]
        known_epoch, cursor = self._seen.get(replica, (None, 0))
        if known_epoch != epoch:
            cursor = 0
        first = events[0][0] if events else next_seq
        if first > cursor:
            index.forget(replica)  # events were missed; an eviction may be among them
        applied = 0
        for seq, kind, hashes in events:
            if seq < cursor:
                continue
            if kind == "stored":
                index.stored(replica, hashes)
            elif kind == "evicted":
                index.evicted(replica, hashes)
            applied += 1
        self._seen[replica] = (epoch, next_seq)
        return applied

    def drop(self, replica: Hashable) -> None:
        """Forget the cursor of a replica that is gone."""
        self._seen.pop(replica, None)
