"""The host-memory tier: hash chunks of KV evicted from the device, kept in RAM.

The pool is cut into slots of one hash chunk each (``blocks_per_chunk`` KV blocks, the
paged layout of the device pools, pinned on CUDA). A chunk is found by its chained
64-bit hash and stores the 128-bit digest of the prefix before it (``chunk_chains``)
and its own token ids; lookups verify both, so a colliding hash never serves KV of
other tokens or of the same tokens after another prefix.

Device eviction trims runs block by block from their end, so a chunk may arrive in
pieces, last block first. A ``HostChunk`` therefore holds the suffix of its blocks
from ``first_block`` on; later pieces extend it downwards until it is complete.

Eviction is LRU over chunks. Callers touch a chain of chunks from its last chunk to
its first, so within a chain a prefix is always more recent than its suffix and
leaves go first. Chunks pinned by an onload in progress are never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from prefixcache.cache.block_pool import BlockPool
from prefixcache.tiers.transfer import KVLayers


@dataclass(slots=True, eq=False)
class HostChunk:
    """One hash chunk in the host pool: blocks ``first_block ..`` of slot ``slot`` hold KV."""

    chunk_hash: int
    parent: bytes  # digest of the whole prefix before the chunk
    start: int  # position of the chunk's first token in its sequence
    tokens: np.ndarray  # all chunk_size token ids of the chunk
    slot: int
    first_block: int
    pins: int = 0

    @property
    def complete(self) -> bool:
        """True when every block of the chunk holds KV."""
        return self.first_block == 0

    def matches(self, parent: bytes, start: int, tokens: np.ndarray) -> bool:
        """True if this chunk holds exactly ``tokens`` after the prefix named by ``parent``."""
        return self.parent == parent and self.start == start and np.array_equal(self.tokens, tokens)


class HostTier:
    """``num_slots`` chunks of host KV, LRU-evicted; ``on_evict(chunk)`` runs before a
    chunk's slot is reused (e.g. to write it to disk)."""

    def __init__(
        self,
        num_slots: int,
        blocks_per_chunk: int,
        block_shape: tuple[int, ...],
        num_layers: int,
        dtype: torch.dtype,
        pin_memory: bool = False,
        on_evict: Callable[[HostChunk], None] | None = None,
    ) -> None:
        shape = (num_slots * blocks_per_chunk, *block_shape)
        self.layers: KVLayers = [
            (
                torch.zeros(shape, dtype=dtype, pin_memory=pin_memory),
                torch.zeros(shape, dtype=dtype, pin_memory=pin_memory),
            )
            for _ in range(num_layers)
        ]
        self.blocks_per_chunk = blocks_per_chunk
        self.on_evict = on_evict
        self.evicted_blocks = 0
        self._slots = BlockPool(num_slots)
        self._lru: OrderedDict[int, HostChunk] = OrderedDict()  # oldest first
        self._by_parent: dict[bytes, list[HostChunk]] = {}

    @property
    def num_blocks(self) -> int:
        """KV blocks the pool can hold."""
        return self._slots.num_blocks * self.blocks_per_chunk

    @property
    def num_used_blocks(self) -> int:
        """KV blocks holding data now."""
        return sum(self.blocks_per_chunk - c.first_block for c in self._lru.values())

    @property
    def num_chunks(self) -> int:
        """Chunks stored (complete or not)."""
        return len(self._lru)

    @property
    def bytes(self) -> int:
        """Memory held by the pool."""
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    def get(self, chunk_hash: int) -> HostChunk | None:
        """The chunk stored under ``chunk_hash``, if any (verify it with ``matches``)."""
        return self._lru.get(chunk_hash)

    def with_parent(self, parent: bytes) -> list[HostChunk]:
        """Chunks that follow the prefix named by ``parent``."""
        return list(self._by_parent.get(parent, ()))

    def add(
        self, chunk_hash: int, parent: bytes, start: int, tokens: np.ndarray, first_block: int
    ) -> HostChunk | None:
        """Store a new chunk holding blocks ``first_block ..`` (the caller copies them in).

        Evicts the least recently used unpinned chunk when no slot is free; returns
        None (storing nothing) when every chunk is pinned.
        """
        if chunk_hash in self._lru:
            raise ValueError(f"chunk {chunk_hash:#x} is already in the host tier")
        if not self._slots.num_free and not self._evict_one():
            return None
        (slot,) = self._slots.allocate(1)
        chunk = HostChunk(chunk_hash, parent, start, tokens.copy(), slot, first_block)
        self._lru[chunk_hash] = chunk
        self._by_parent.setdefault(parent, []).append(chunk)
        return chunk

    def block_ids(self, chunk: HostChunk, lo: int, hi: int) -> list[int]:
        """Host block ids of blocks ``lo .. hi-1`` of ``chunk``."""
        base = chunk.slot * self.blocks_per_chunk
        return list(range(base + lo, base + hi))

    def touch(self, chunks: Iterable[HostChunk]) -> None:
        """Mark ``chunks`` used, in order: the last one becomes the most recent."""
        for chunk in chunks:
            self._lru.move_to_end(chunk.chunk_hash)

    def check_integrity(self, at_rest: bool = True) -> None:
        """Raise ``AssertionError`` unless slots, indexes and pins agree."""
        chunks = list(self._lru.values())
        slots = {c.slot for c in chunks}
        assert len(slots) == len(chunks), "two host chunks share a slot"
        assert self._slots.num_free + len(chunks) == self._slots.num_blocks, (
            f"host slots leaked: {self._slots.num_free} free + {len(chunks)} used "
            f"!= {self._slots.num_blocks}"
        )
        for chunk in chunks:
            assert self._slots.ref_count(chunk.slot) == 1, f"slot {chunk.slot} not held once"
            assert 0 <= chunk.first_block < self.blocks_per_chunk, "bad first_block"
            assert self._lru[chunk.chunk_hash] is chunk, "host index out of step"
            assert any(c is chunk for c in self._by_parent.get(chunk.parent, ())), "parent index"
            assert not (at_rest and chunk.pins), f"chunk {chunk.chunk_hash:#x} still pinned"
        assert sum(map(len, self._by_parent.values())) == len(chunks), "stale parent index"

    def _evict_one(self) -> bool:
        victim = next((c for c in self._lru.values() if not c.pins), None)
        if victim is None:
            return False
        if self.on_evict is not None:
            self.on_evict(victim)
        self.evicted_blocks += self.blocks_per_chunk - victim.first_block
        self._remove(victim)
        return True

    def _remove(self, chunk: HostChunk) -> None:
        del self._lru[chunk.chunk_hash]
        siblings = self._by_parent[chunk.parent]
        siblings[:] = [c for c in siblings if c is not chunk]
        if not siblings:
            del self._by_parent[chunk.parent]
        self._slots.free([chunk.slot])
