"""The host-memory tier: chunks of KV evicted from the device, kept in RAM.

The pool is cut into slots of one hash chunk each (``blocks_per_chunk`` KV blocks,
pinned on CUDA so copies are DMA transfers); a slot holds a whole chunk or its first
``m`` blocks. Chunks are indexed by the digest of the prefix before them, the way the
radix tree keys children, so a lookup finds the stored chunk sharing the most leading
blocks with the asker's tokens, whether the asker has fewer tokens of the chunk (the
same prompt again), more (a next turn) or others after some blocks (another question
after the same document). Only chunks after the same prefix digest at the same
position are candidates, and the shared tokens are compared one by one, so a colliding
hash never serves KV of other tokens or of the same tokens after another prefix.

Eviction is LRU over chunks. A stored chunk covered by a longer one with the same
tokens is redundant and goes when the longer one arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from chunking.hashing import common_prefix_length, same_tokens
from prefixcache.cache.block_pool import BlockPool
from prefixcache.tiers.base import ChunkQuery, KVChunk, starts_with
from prefixcache.tiers.registry import TierContext, register_kv_tier
from prefixcache.tiers.stats import TierStats


@dataclass(slots=True, eq=False)
class _HostEntry:
    """A chunk in slot ``slot``: KV for every token of ``tokens`` (whole blocks)."""

    key: int
    parent: bytes
    start: int
    tokens: np.ndarray
    slot: int


class HostTier:
    """``num_slots`` chunks of KV in host memory, LRU-evicted (see the module docstring)."""

    name = "host"
    persistent = False

    def __init__(
        self,
        num_slots: int,
        chunk_shape: tuple[int, ...],
        dtype: torch.dtype,
        pin_memory: bool = False,
    ) -> None:
        num_layers, _, blocks_per_chunk, *block_shape = chunk_shape
        # Block-major slots: a chunk's first m blocks are one contiguous range, so a
        # copy of them to the device is a single transfer.
        shape = (num_slots, blocks_per_chunk, num_layers, 2, *block_shape)
        self.pool = torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)
        self.block_size = block_shape[0]
        self.blocks_per_chunk = blocks_per_chunk
        self.block_bytes = self.pool[0, 0].numel() * self.pool.element_size()
        self.on_evict: Callable[[KVChunk], None] | None = None
        self.stored_blocks = self.evicted_blocks = self.written_bytes = 0
        self._pinned = pin_memory
        self._slots = BlockPool(num_slots)
        self._lru: OrderedDict[int, _HostEntry] = OrderedDict()  # by slot, oldest first
        self._by_parent: dict[bytes, list[_HostEntry]] = {}

    @classmethod
    def from_context(cls, context: TierContext) -> HostTier:
        """The host tier of ``context.config.host_cache_tokens`` tokens (whole chunks)."""
        slots = context.config.host_cache_tokens // context.chunk_size
        if slots <= 0:
            raise ValueError("the host tier needs host_cache_tokens of at least one chunk")
        pin = context.device.type == "cuda"
        return cls(slots, context.chunk_shape, context.dtype, pin_memory=pin)

    @property
    def num_used_blocks(self) -> int:
        """KV blocks holding data now."""
        return sum(len(e.tokens) for e in self._lru.values()) // self.block_size

    # -- the KVTier protocol ----------------------------------------------------------

    def contains(self, query: ChunkQuery) -> bool:
        """True if a stored chunk covers every token of ``query``."""
        return self._covering(query.parent, query.start, query.tokens) is not None

    def touch(self, query: ChunkQuery) -> bool:
        """Mark the chunk covering ``query`` most recently used; False if there is none."""
        entry = self._covering(query.parent, query.start, query.tokens)
        if entry is not None:
            self._lru.move_to_end(entry.slot)
        return entry is not None

    def get(self, query: ChunkQuery) -> KVChunk | None:
        """The chunk sharing the most leading blocks with ``query``; its data is a view of
        the pool, valid until the next ``put`` or ``discard``."""
        best, best_blocks = None, 0
        for entry in self._siblings(query.parent, query.start):
            shared = common_prefix_length(entry.tokens, query.tokens) // self.block_size
            if shared > best_blocks:
                best, best_blocks = entry, shared
        return None if best is None else self._as_chunk(best)

    def put(self, chunk: KVChunk) -> bool:
        """Copy ``chunk`` into a slot, evicting the least recently used chunk if none is
        free; a chunk already covered is only touched."""
        covering = self._covering(chunk.parent, chunk.start, chunk.tokens)
        if covering is not None:
            self._lru.move_to_end(covering.slot)
            return False
        for entry in self._siblings(chunk.parent, chunk.start):
            if starts_with(chunk.tokens, entry.tokens):
                self._remove(entry)  # redundant: the new chunk holds all of it
        if not self._slots.num_free and not self._evict_one():
            return False
        (slot,) = self._slots.allocate(1)
        num_blocks = len(chunk.tokens) // self.block_size
        self.pool[slot, :num_blocks].copy_(chunk.data.permute(2, 0, 1, 3, 4, 5), non_blocking=True)
        entry = _HostEntry(chunk.key, chunk.parent, chunk.start, chunk.tokens.copy(), slot)
        self._lru[slot] = entry
        self._by_parent.setdefault(chunk.parent, []).append(entry)
        self.stored_blocks += num_blocks
        self.written_bytes += num_blocks * self.block_bytes
        return True

    def discard(self, chunk: KVChunk) -> None:
        """Drop the stored chunk ``chunk``, if it is still here."""
        for entry in self._siblings(chunk.parent, chunk.start):
            if entry.key == chunk.key and same_tokens(entry.tokens, chunk.tokens):
                self._remove(entry)
                return

    def stats(self) -> TierStats:
        """Slots in blocks and bytes, chunks held, blocks stored and evicted."""
        capacity = self._slots.num_blocks * self.blocks_per_chunk
        used = self.num_used_blocks
        return TierStats(
            name=self.name,
            capacity_blocks=capacity,
            used_blocks=used,
            capacity_bytes=capacity * self.block_bytes,
            used_bytes=used * self.block_bytes,
            entries=len(self._lru),
            stored_blocks=self.stored_blocks,
            evicted_blocks=self.evicted_blocks,
            written_bytes=self.written_bytes,
        )

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless slots and indexes agree."""
        entries = list(self._lru.values())
        assert self._slots.num_free + len(entries) == self._slots.num_blocks, (
            f"host slots leaked: {self._slots.num_free} free + {len(entries)} used "
            f"!= {self._slots.num_blocks}"
        )
        for slot, entry in self._lru.items():
            assert entry.slot == slot, "host index out of step"
            assert self._slots.ref_count(slot) == 1, f"slot {slot} not held once"
            blocks, rest = divmod(len(entry.tokens), self.block_size)
            assert 0 < blocks <= self.blocks_per_chunk and not rest, "bad host chunk length"
            assert any(e is entry for e in self._by_parent.get(entry.parent, ())), "parent index"
        assert sum(map(len, self._by_parent.values())) == len(entries), "stale parent index"

    # -- internals --------------------------------------------------------------------

    def _siblings(self, parent: bytes, start: int) -> list[_HostEntry]:
        return [e for e in self._by_parent.get(parent, ()) if e.start == start]

    def _covering(self, parent: bytes, start: int, tokens: np.ndarray) -> _HostEntry | None:
        return next(
            (e for e in self._siblings(parent, start) if starts_with(e.tokens, tokens)), None
        )

    def _as_chunk(self, entry: _HostEntry) -> KVChunk:
        num_blocks = len(entry.tokens) // self.block_size
        data = self.pool[entry.slot, :num_blocks].permute(1, 2, 0, 3, 4, 5)
        return KVChunk(entry.key, entry.parent, entry.start, entry.tokens, data)

    def _evict_one(self) -> bool:
        if not self._lru:
            return False
        victim = next(iter(self._lru.values()))
        if self.on_evict is not None:
            if self._pinned:  # copies into the slot may still be in flight
                torch.cuda.synchronize()
            self.on_evict(self._as_chunk(victim))
        self.evicted_blocks += len(victim.tokens) // self.block_size
        self._remove(victim)
        return True

    def _remove(self, entry: _HostEntry) -> None:
        del self._lru[entry.slot]
        siblings = self._by_parent[entry.parent]
        siblings[:] = [e for e in siblings if e is not entry]
        if not siblings:
            del self._by_parent[entry.parent]
        self._slots.free([entry.slot])


register_kv_tier("host", HostTier.from_context)
