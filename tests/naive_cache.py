"""The obvious prefix cache: one dict entry per cached block, keyed by its whole prefix.

It has ``RadixCache``'s contract (match, insert, lock, unlock, evict, LRU order,
duplicate release) in the plainest code there is, O(cached blocks) per step, and
serves as the oracle the radix tree is tested against.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.radix_cache import CacheStats, InsertResult, MatchResult

_Key = tuple[str | None, tuple[int, ...]]


class NaivePath(NamedTuple):
    """The ``node`` of a naive result: the salt and the whole-block token prefix."""

    salt: str | None
    tokens: tuple[int, ...]


@dataclass(slots=True)
class _Entry:
    block_id: int
    lock_ref: int = 0
    last_used: int = 0
    num_children: int = 0


class NaiveCache:
    """Dict-of-prefixes prefix cache with the same interface as ``RadixCache``."""

    def __init__(
        self, pool: BlockPool, block_size: int = 16, chunk_size: int = 256, fingerprint: str = ""
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.chunk_size = chunk_size  # unused: there are no hashes to chunk
        self.fingerprint = fingerprint  # unused: one cache serves one model
        self.stats = CacheStats()
        self._entries: dict[_Key, _Entry] = {}
        self._root_locks: Counter[str | None] = Counter()
        self._tick = 0

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the cache holds a reference on."""
        return len(self._entries)

    @property
    def num_locked_blocks(self) -> int:
        """Cached blocks on some locked path."""
        return sum(1 for entry in self._entries.values() if entry.lock_ref)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks that ``evict`` could free now."""
        return self.num_cached_blocks - self.num_locked_blocks

    def match(self, token_ids: Sequence[int] | np.ndarray, salt: str | None = None) -> MatchResult:
        """Longest cached whole-block prefix; locks it like ``RadixCache.match``."""
        keys = self._keys(token_ids, salt)
        hits = 0
        while hits < len(keys) and keys[hits] in self._entries:
            hits += 1
        node = NaivePath(salt, keys[hits - 1][1] if hits else ())
        self.lock(node)
        self._touch(keys[:hits])
        self.stats.query_tokens += len(token_ids)
        self.stats.hit_tokens += hits * self.block_size
        return MatchResult(hits * self.block_size, self._block_ids(keys[:hits]), node)

    def insert(
        self,
        token_ids: Sequence[int] | np.ndarray,
        block_ids: Sequence[int],
        salt: str | None = None,
    ) -> InsertResult:
        """Store each block not yet cached; release duplicates, like ``RadixCache.insert``."""
        block_ids = list(block_ids)
        if len(token_ids) != len(block_ids) * self.block_size:
            raise ValueError("insert needs len(token_ids) == len(block_ids) * block_size")
        keys = self._keys(token_ids, salt)
        existing = sum(1 for key in keys if key in self._entries)
        duplicates = []
        for key, block_id in zip(keys, block_ids, strict=True):
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(block_id)
                self._parent_entry(key, +1)
            elif entry.block_id != block_id:
                duplicates.append(block_id)
        self._touch(keys)
        self.pool.free(duplicates)
        node = NaivePath(salt, keys[-1][1] if keys else ())
        return InsertResult(existing * self.block_size, self._block_ids(keys), node)

    def lock(self, node: NaivePath) -> None:
        """Lock every block of the prefix ``node`` names."""
        self._root_locks[node.salt] += 1
        for key in self._path(node):
            self._entries[key].lock_ref += 1

    def unlock(self, node: NaivePath) -> None:
        """Undo one ``lock(node)``; raises ``ValueError`` if it is not locked."""
        path = self._path(node)
        if not self._root_locks[node.salt] or (path and not self._entries[path[-1]].lock_ref):
            raise ValueError("unlock of a node that is not locked")
        self._root_locks[node.salt] -= 1
        for key in path:
            self._entries[key].lock_ref -= 1

    def evict(self, num_blocks: int) -> int:
        """Free up to ``num_blocks`` unlocked leaf blocks, least recently used first."""
        freed = 0
        while freed < num_blocks:
            leaves = [
                (entry.last_used, key)
                for key, entry in self._entries.items()
                if not entry.lock_ref and not entry.num_children
            ]
            if not leaves:
                break
            _, key = min(leaves, key=lambda leaf: leaf[0])
            self.pool.free([self._entries.pop(key).block_id])
            self._parent_entry(key, -1)
            freed += 1
        self.stats.evicted_blocks += freed
        return freed

    def flush(self) -> int:
        """Drop every unlocked block; return how many."""
        freed = self.evict(self.num_evictable_blocks)
        self.stats.evicted_blocks -= freed
        return freed

    def _keys(self, token_ids: Sequence[int] | np.ndarray, salt: str | None) -> list[_Key]:
        tokens = tuple(int(t) for t in token_ids)
        ends = range(self.block_size, len(tokens) + 1, self.block_size)
        return [(salt, tokens[:end]) for end in ends]

    def _path(self, node: NaivePath) -> list[_Key]:
        keys = self._keys(node.tokens, node.salt)
        if any(key not in self._entries for key in keys):
            raise ValueError("node is no longer in the cache")
        return keys

    def _touch(self, keys: list[_Key]) -> None:
        self._tick += 1
        for key in keys:
            self._entries[key].last_used = self._tick

    def _block_ids(self, keys: list[_Key]) -> list[int]:
        return [self._entries[key].block_id for key in keys]

    def _parent_entry(self, key: _Key, delta: int) -> None:
        salt, tokens = key
        parent = self._entries.get((salt, tokens[: -self.block_size]))
        if parent is not None:
            parent.num_children += delta
