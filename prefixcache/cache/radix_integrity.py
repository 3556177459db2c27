"""Consistency checks of the radix prefix cache, for tests and debugging."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from chunking.hashing import TOKEN_DTYPE, chunk_hashes, root_seed
from prefixcache.cache.radix_node import TreeNode, is_evictable

if TYPE_CHECKING:
    from prefixcache.cache.radix_cache import RadixCache


def check_tree(cache: RadixCache, num_held_outside: int = 0) -> None:
    """Raise ``AssertionError`` unless the tree, its counters and the pool agree.

    ``num_held_outside``: blocks allocated from the pool that the tree does not
    hold (a running sequence's own blocks); at rest it is 0.
    """
    seen: set[int] = set()
    live_heap = {seq for _, seq, leaf in cache._heap if seq == leaf.heap_seq}
    cached = locked = nodes = 0
    for salt, root in cache._roots.items():
        _require(root.salt == salt and root.attached and not len(root.tokens), "bad root")
        _require(root.seed == root_seed(cache.fingerprint, salt), f"bad seed, salt {salt!r}")
        stack = [(root, np.empty(0, TOKEN_DTYPE))]
        while stack:
            node, prefix = stack.pop()
            path_tokens = np.concatenate((prefix, node.tokens))
            _check_node(cache, node, path_tokens, root.seed, seen, live_heap)
            cached += len(node.block_ids)
            locked += len(node.block_ids) if node.lock_ref else 0
            nodes += node is not root
            stack += [(child, path_tokens) for child in node.children.values()]
    counts = (cached, locked, nodes)
    expected = (cache._num_cached, cache._num_locked, cache._num_nodes)
    _require(counts == expected, f"cached/locked/nodes {counts} != counters {expected}")
    total = cache.pool.num_free + cache.num_evictable_blocks + locked + num_held_outside
    _require(
        total == cache.pool.num_blocks,
        f"free {cache.pool.num_free} + evictable {cache.num_evictable_blocks} + locked "
        f"{locked} + outside {num_held_outside} != {cache.pool.num_blocks} blocks",
    )


def _check_node(
    cache: RadixCache,
    node: TreeNode,
    path_tokens: np.ndarray,
    seed: int,
    seen: set[int],
    live_heap: set[int],
) -> None:
    bs, cs = cache.block_size, cache.chunk_size
    where = f"node at {node.start}..{node.end}"
    _require(node.attached and node.lock_ref >= 0, f"{where}: detached or negative lock")
    child_locks = sum(child.lock_ref for child in node.children.values())
    _require(node.lock_ref >= child_locks, f"{where}: lock {node.lock_ref} < children's")
    for key, child in node.children.items():
        _require(child.parent is node and child.start == node.end, f"{where}: bad child")
        _require(key == child.tokens[:bs].tobytes(), f"{where}: child under wrong key")
    if node.parent is None:
        return
    _require(len(node.tokens) > 0, f"{where}: empty")
    _require(len(node.tokens) == len(node.block_ids) * bs, f"{where}: blocks != tokens")
    expected = chunk_hashes(path_tokens, cs, seed)[node.start // cs : node.end // cs]
    _require(node.hashes == expected, f"{where}: chunk hashes do not match its tokens")
    for block_id in node.block_ids:
        _require(block_id not in seen, f"{where}: block {block_id} stored twice")
        _require(cache.pool.ref_count(block_id) > 0, f"{where}: block {block_id} is free")
        seen.add(block_id)
    if is_evictable(node):
        _require(node.heap_seq in live_heap, f"{where}: evictable leaf not in LRU heap")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
