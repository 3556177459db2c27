"""Cache events: which chunk chains an engine holds, for routers that send a request
to the replica that has its prefix.

An engine records two kinds of ``ChunkEvent``:

- ``"stored"``: full hash chunks entered the device prefix cache (computed, or brought
  back from a tier);
- ``"evicted"``: full hash chunks left the last *local* tier that held them (the device
  when it has no host or disk tier below it, else the last of those), or were flushed.
  A shared tier (a Redis server) does not count as holding a chunk for one engine.
  Evicted chunks come suffix first, as the cache drops them: a prefix never leaves
  before its continuation.

Chunks are named by their chained 64-bit hashes (``chunking.hashing``), the radix
tree's keys: the root seed mixes the model fingerprint and the tenant salt, so a hash
names a whole prefix of one tenant, and a router keyed by the same function matches
exactly. Events are batched: whatever one engine step (or one cache-control command)
records is published as one list, to subscribers called on the engine's thread. With
no subscriber nothing is recorded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

logger = logging.getLogger(__name__)

EventKind = Literal["stored", "evicted"]


class ChunkEvent(NamedTuple):
    """Full chunks of one tenant that an engine started or stopped holding.

    ``salt`` is the tenant salt of the chains (None: no tenant). A lower tier does not
    record salts, so evictions from it carry ``salt=None`` whatever the tenant; the
    hashes name the chains either way, since every chain is seeded by its salt.
    """

    kind: EventKind
    salt: str | None
    chunk_hashes: tuple[int, ...]


CacheEventCallback = Callable[[list[ChunkEvent]], None]


class CacheEvents:
    """Collects chunk events during a step and publishes them to subscribers in one batch.

    ``record`` and ``publish`` run on the engine's thread; ``subscribe`` and the
    returned unsubscribe may be called from any thread.
    """

    def __init__(self) -> None:
        # Full chunks the device cache holds now, kept whether or not anyone listens, so
        # a chunk a lower tier drops while the device still holds it is not "evicted".
        self.on_device: set[int] = set()
        self._pending: list[ChunkEvent] = []
        self._subscribers: dict[int, CacheEventCallback] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True while anyone listens (events are only recorded then)."""
        return bool(self._subscribers)

    def subscribe(self, callback: CacheEventCallback) -> Callable[[], None]:
        """Call ``callback(events)`` with each published batch; returns an unsubscribe.

        The callback runs on the engine's thread between steps: it must be quick and
        must not call back into the engine (hand the list to a queue). An exception it
        raises is logged and ignored.
        """
        if not callable(callback):
            raise ValueError(f"a cache event callback must be callable, got {callback!r}")
        with self._lock:
            key, self._next_id = self._next_id, self._next_id + 1
            self._subscribers[key] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)

        return unsubscribe

    def record(self, kind: EventKind, salt: str | None, chunk_hashes: Iterable[int]) -> None:
        """Note that the chunks ``chunk_hashes`` of ``salt`` were stored or evicted."""
        if not self._subscribers:
            return
        hashes = tuple(chunk_hashes)
        if not hashes:
            return
        last = self._pending[-1] if self._pending else None
        if last is not None and last.kind == kind and last.salt == salt:
            self._pending[-1] = last._replace(chunk_hashes=last.chunk_hashes + hashes)
        else:
            self._pending.append(ChunkEvent(kind, salt, hashes))

    def device_added(self, salt: str | None, chunk_hashes: list[int]) -> None:
        """Full chunks entered the device cache: note them, record them as stored."""
        self.on_device.update(chunk_hashes)
        self.record("stored", salt, chunk_hashes)

    def device_dropped(self, chunk_hashes: list[int]) -> None:
        """Full chunks left the device cache (whether a tier took them is told apart)."""
        self.on_device.difference_update(chunk_hashes)

    def publish(self) -> None:
        """Hand what was recorded since the last call to every subscriber, as one list."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        with self._lock:
            subscribers = list(self._subscribers.values())
        for callback in subscribers:
            try:
                callback(list(batch))
            except Exception:
                logger.exception("a cache event subscriber failed; its batch is lost")
