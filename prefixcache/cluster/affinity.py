"""Prefix-affinity routing without Ray: which replica holds which chunk chains.

A request is keyed by the chained 64-bit chunk hashes of its prompt, made with the
same function, model fingerprint and tenant salt as the replicas' prefix caches
(``chunking.hashing``). Since the hash of chunk ``i`` names the whole prefix through
``i``, a replica holding it holds that prefix (the radix tree evicts a suffix before
its prefix), and two tenants' chains never meet: their root seeds differ.

The index learns what a replica holds from what was routed to it and is corrected by
the replica's cache events (chunks stored, chunks evicted from every tier), so an
eviction stops attracting traffic. ``AffinityIndex.choose`` is the whole policy.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from chunking.hashing import chunk_hashes, root_seed

ReplicaKey = Hashable
DEFAULT_IMBALANCE_THRESHOLD = 8  # requests; a long prefix is worth a short wait
DEFAULT_MAX_CHAINS = 1 << 20  # per replica: 8 MB of hashes, ~268M tokens of 256-token chunks


class Choice(NamedTuple):
    """Where one request goes and why.

    ``reason`` is ``"affinity"`` (longest cached match), ``"imbalanced"`` (the best
    match's queue was too long; the shortest queue won) or ``"balance"`` (nothing
    matched: power of two choices).
    """

    replica: ReplicaKey
    matched_chunks: int
    reason: str


class AffinityIndex:
    """Per replica, the chunk chains it holds; picks a replica for a request.

    ``imbalance_threshold``: how many more queued requests than the least-loaded
    replica the best-matching one may have and still be chosen. ``max_chains``
    bounds what is kept per replica (least recently used chains are dropped first,
    which only costs affinity, never correctness).
    """

    def __init__(
        self,
        fingerprint: str,
        chunk_size: int,
        *,
        imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
        max_chains: int = DEFAULT_MAX_CHAINS,
        rng: random.Random | None = None,
    ) -> None:
        if not fingerprint:
            raise ValueError("fingerprint must be a non-empty model fingerprint")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if not isinstance(imbalance_threshold, int) or imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be >= 0, got {imbalance_threshold!r}")
        if not isinstance(max_chains, int) or max_chains <= 0:
            raise ValueError(f"max_chains must be a positive integer, got {max_chains!r}")
        self.fingerprint = fingerprint
        self.chunk_size = chunk_size
        self.imbalance_threshold = imbalance_threshold
        self.max_chains = max_chains
        self._rng = rng or random.Random()
        self._held: dict[ReplicaKey, OrderedDict[int, None]] = {}

    def key(self, prompt_ids: Sequence[int] | np.ndarray, salt: str | None) -> list[int]:
        """The chained hashes of the prompt's full chunks, as the replicas' caches name
        them for this tenant ``salt``."""
        return chunk_hashes(prompt_ids, self.chunk_size, root_seed(self.fingerprint, salt))

    @property
    def replicas(self) -> list[ReplicaKey]:
        """The replicas the index knows."""
        return list(self._held)

    def held(self, replica: ReplicaKey) -> int:
        """How many chains ``replica`` is believed to hold."""
        return len(self._held.get(replica, ()))

    def set_replicas(self, replicas: Iterable[ReplicaKey]) -> None:
        """Track exactly ``replicas``: new ones start empty, gone ones are forgotten."""
        wanted = list(replicas)
        for gone in set(self._held) - set(wanted):
            del self._held[gone]
        for replica in wanted:
            self._held.setdefault(replica, OrderedDict())

    def stored(self, replica: ReplicaKey, hashes: Iterable[int]) -> None:
        """``replica`` holds these chains now (routed there, or its cache said so)."""
        held = self._held.get(replica)
        if held is None:
            return  # a replica already gone: its news no longer matters
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_chains:
            held.popitem(last=False)

    def evicted(self, replica: ReplicaKey, hashes: Iterable[int]) -> None:
        """``replica`` no longer holds these chains in any tier."""
        held = self._held.get(replica)
        if held is not None:
            for h in hashes:
                held.pop(h, None)

    def forget(self, replica: ReplicaKey) -> None:
        """Drop everything believed of ``replica`` (it lost events, or restarted)."""
        if replica in self._held:
            self._held[replica] = OrderedDict()

    def matched_chunks(self, replica: ReplicaKey, hashes: Sequence[int]) -> int:
        """Leading chunks of ``hashes`` that ``replica`` holds."""
        held = self._held.get(replica, {})
        count = 0
        for h in hashes:
            if h not in held:
                break
            count += 1
        return count

    def choose(self, hashes: Sequence[int], queue_lens: Mapping[ReplicaKey, int]) -> Choice:
        """The replica for a request keyed by ``hashes`` among ``queue_lens``'s keys.

        The longest cached match wins (ties: the shorter queue) unless its queue is
        more than ``imbalance_threshold`` longer than the shortest, then the shortest
        queue wins; with no match at all, the shorter queue of two random replicas.
        """
        if not queue_lens:
            raise ValueError("no replica to choose from")
        candidates = list(queue_lens)
        matches = {r: self.matched_chunks(r, hashes) for r in candidates}
        best = max(matches.values())
        if best == 0:
            pair = self._rng.sample(candidates, min(2, len(candidates)))
            return Choice(min(pair, key=lambda r: queue_lens[r]), 0, "balance")
        winner = min((r for r in candidates if matches[r] == best), key=lambda r: queue_lens[r])
        shortest = min(candidates, key=lambda r: queue_lens[r])
        if queue_lens[winner] - queue_lens[shortest] > self.imbalance_threshold:
            return Choice(shortest, matches[shortest], "imbalanced")
        return Choice(winner, best, "affinity")
