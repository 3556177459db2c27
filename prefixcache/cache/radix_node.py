"""Nodes and result types of the radix prefix cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass(slots=True, eq=False, repr=False)
class TreeNode:
    """A run of cached blocks; callers only pass it back to ``lock`` and ``unlock``.

    ``hashes[j]`` is the chained hash of chunk ``start // chunk_size + j``; the node
    holds the hashes of exactly the chunks that end inside ``(start, end]``.
    """

    parent: TreeNode | None
    start: int  # position of tokens[0] in the cached sequence
    tokens: np.ndarray
    block_ids: list[int]
    hashes: list[int] = field(default_factory=list)
    children: dict[bytes, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0  # locks on this node plus all locks on its descendants
    last_used: int = 0
    heap_seq: int = -1  # sequence number of this node's live LRU-heap entry
    attached: bool = True

    @property
    def end(self) -> int:
        """Position just past this node's last token."""
        return self.start + len(self.tokens)

    def __repr__(self) -> str:
        return f"TreeNode({self.start}..{self.end}, lock_ref={self.lock_ref})"


@dataclass(slots=True, eq=False, repr=False)
class RootNode(TreeNode):
    salt: str | None = None
    seed: int = 0


class MatchResult(NamedTuple):
    """``num_tokens`` cached leading tokens, their borrowed blocks, and the locked node."""

    num_tokens: int
    block_ids: list[int]
    node: TreeNode


class InsertResult(NamedTuple):
    """Leading tokens already cached, the tree's blocks for all positions, the deepest node."""

    num_existing_tokens: int
    block_ids: list[int]
    node: TreeNode


class EvictedRun(NamedTuple):
    """What ``on_evict`` receives before blocks go back to the pool (e.g. to copy KV out).

    ``block_ids`` hold the last ``len(block_ids) * block_size`` tokens of ``token_ids``.
    ``token_ids`` start at ``start``, the beginning of the chunk holding the first evicted
    token, so a receiver can name the data by ``seed`` (the chained hash of the chunk
    before ``start``; the root seed when ``start == 0``) and the tokens.
    ``chunk_hashes`` are the chained hashes of the full chunks that end among the
    evicted blocks. ``head_block_ids`` hold the tokens before the evicted ones (from
    ``start``): they stay cached, so a receiver can copy a chunk out whole, from its
    start, although eviction trims it from its end. Runs are evicted suffix first.
    ``salt`` is the tenant salt of the tree, filled in only while cache events are
    recorded (None otherwise).
    """

    seed: int
    start: int
    token_ids: np.ndarray
    block_ids: list[int]
    chunk_hashes: list[int]
    head_block_ids: list[int]
    salt: str | None = None


@dataclass(slots=True)
class CacheStats:
    """Counters since construction (or the last ``reset``)."""

    query_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried tokens served from the cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


def is_evictable(node: TreeNode) -> bool:
    """An attached, unlocked leaf below a root."""
    return node.attached and node.parent is not None and not node.lock_ref and not node.children
