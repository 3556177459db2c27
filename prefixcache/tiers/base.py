"""The protocol every KV tier behind the device pool implements, and the values it moves.

A tier stores *chunks*: the KV of the first ``m`` blocks (``1 <= m <= blocks_per_chunk``)
of one hash chunk of a sequence, so a prompt that ends inside a chunk is stored and
matched down to its last full block, as the device cache does. A stored chunk is named
by its key, the chained xxh3 hash of its tokens seeded by the hash of the chunk before
(``chunk_key``; for a whole chunk this is the radix tree's chunk hash), and carries the
128-bit digest of the whole prefix before it (``chunk_chains``), its start position and
its token ids. The tiered cache checks all three on every chunk a tier returns, so a
colliding key never serves KV of other tokens, nor of the same tokens after another
prefix.

The tiered cache (``tiered.py``) holds an ordered list of tiers and is the only caller;
it knows no tier by name. It guards every call: a tier that raises is logged and its
answer is taken as a miss or a skipped store, so a tier's failure (a disk full, a
server gone) never fails a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from chunking.hashing import chunk_hashes, common_prefix_length, same_tokens
from prefixcache.tiers.stats import TierStats


def chunk_key(seed: int, tokens: np.ndarray) -> int:
    """The key of a stored chunk: the chained hash of ``tokens`` (whole blocks of one hash
    chunk, from its start) seeded by ``seed``, the hash of the chunk before it."""
    return chunk_hashes(tokens, len(tokens), seed)[0]


def starts_with(tokens: np.ndarray, prefix: np.ndarray) -> bool:
    """True if ``tokens`` begin with all of ``prefix``."""
    return len(prefix) <= len(tokens) and same_tokens(tokens[: len(prefix)], prefix)


class ChunkQuery(NamedTuple):
    """A lookup: the chunk at ``start`` after a prefix, and the asker's tokens of it.

    ``tokens`` are whole blocks from the chunk's start (its first one up to all of them);
    ``seed`` is the chained hash of the prefix before (what keys are seeded by) and
    ``parent`` its digest (what a stored chunk is verified by).
    """

    seed: int
    parent: bytes
    start: int
    tokens: np.ndarray

    @property
    def key(self) -> int:
        """The key a stored chunk holding exactly ``tokens`` has."""
        return chunk_key(self.seed, self.tokens)

    def shorter(self, num_tokens: int) -> ChunkQuery:
        """The same query for the first ``num_tokens`` tokens only (whole blocks)."""
        return self._replace(tokens=self.tokens[:num_tokens])


class KVChunk(NamedTuple):
    """One stored chunk: its names, its tokens and its KV.

    ``data`` is ``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`` (K then
    V), ``num_blocks == len(tokens) // block_size``, in the engine's KV dtype. It may
    live on the device or in CPU memory.
    """

    key: int
    parent: bytes  # digest of the whole prefix before the chunk
    start: int  # position of the chunk's first token in its sequence
    tokens: np.ndarray
    data: torch.Tensor

    def matched_tokens(self, query: ChunkQuery) -> int:
        """Leading tokens of ``query`` this chunk holds KV for: 0 unless it follows the
        same prefix at the same position (the caller rounds down to whole blocks)."""
        if self.parent != query.parent or self.start != query.start:
            return 0
        return common_prefix_length(self.tokens, query.tokens)

    def covers(self, query: ChunkQuery) -> bool:
        """True if this chunk holds KV for every token of ``query``."""
        same_place = self.parent == query.parent and self.start == query.start
        return same_place and starts_with(self.tokens, query.tokens)


@runtime_checkable
class KVTier(Protocol):
    """A store of KV chunks behind the device pool (host memory, disk, a shared server).

    Build one through a factory given to ``register_kv_tier``. Tiers are used from the
    engine's loop thread only, one call at a time. Every method is best effort: on an
    error a tier may raise (the tiered cache logs it and carries on) or count it in
    ``TierStats.failures`` and answer as if the chunk were not there.
    """

    name: str
    """The registered name; flat stats keys are ``f"{name}_{field}"``."""

    persistent: bool
    """True if chunks outlive the engine (a disk folder, a server). Every chunk the
    engine computes is then written through to this tier as soon as it is complete, and
    a sequence's partial last chunk when the sequence ends, so a restarted engine finds
    all of them; other tiers receive only what is evicted from the tier above."""

    on_evict: Callable[[KVChunk], None] | None
    """Set by the tiered cache when a tier sits below this one. A tier that drops a
    chunk to make room calls it first with that chunk (its ``data`` readable during the
    call), so the chunk moves down instead of vanishing. A tier whose store evicts on
    its own (a server with its own memory policy) may never call it. When
    ``on_evict.needs_data`` is False (no tier below wants the KV), a tier may pass the
    chunk with empty ``data``, to spare reading it."""

    def contains(self, query: ChunkQuery) -> bool:
        """True if a chunk covering every token of ``query`` is stored; changes nothing."""
        ...

    def touch(self, query: ChunkQuery) -> bool:
        """Mark the chunk covering every token of ``query`` most recently used; False if
        there is none. Callers touch a sequence's chunks from its last to its first, so
        a prefix is evicted after its suffix."""
        ...

    def get(self, query: ChunkQuery) -> KVChunk | None:
        """The stored chunk at ``query.start`` after ``query.parent`` that shares the most
        leading whole blocks with ``query.tokens`` (it may hold more blocks than the query
        has), or None if none shares a block.

        A tier may find chunks by key alone (``query.key``, or ``query.shorter(n).key``
        for fewer tokens): the caller checks every chunk it gets against the query's
        parent digest, start and token ids, and calls ``discard`` on one that fails, so
        a colliding key is a miss. A corrupt entry is a miss too, and the tier drops it.
        The returned ``data`` must stay valid until the tier's next ``put`` or
        ``discard`` (it may be a view of the tier's memory); the caller copies it out
        first. Getting does not mark the chunk used.
        """
        ...

    def put(self, chunk: KVChunk) -> bool:
        """Store a copy of ``chunk``; True if it was stored.

        If a stored chunk already covers it (the same prefix, its tokens starting with
        ``chunk.tokens``), that one is only marked used and False is returned; stored
        chunks that ``chunk`` covers may be dropped as redundant. A full tier makes room
        as it sees fit (calling ``on_evict``) or refuses (False). ``chunk.data`` may live
        on the device: copy what you keep before returning.
        """
        ...

    def discard(self, chunk: KVChunk) -> None:
        """Drop the stored chunk ``chunk`` (as returned by ``get``), if it is still there."""
        ...

    def stats(self) -> TierStats:
        """Sizes and counters now. ``hit_tokens`` is left to the tiered cache, which
        counts the tokens it serves from each tier and adds them in."""
        ...

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless the tier's own bookkeeping adds up."""
        ...
