"""Radix-tree prefix cache of KV blocks, one tree per tenant salt.

A node holds a run of whole KV blocks: their token ids (int32), block ids, the
chained hashes of the hash chunks that end inside the run, a lock count and a
last-use tick. A node's children are keyed by the token bytes of their first block,
so siblings always differ in their first block and a lookup is exact: a hash
collision can never pick the wrong child or serve wrong KV. Nodes split at any block
boundary, so a prefix is shared down to block granularity (inside a chunk too).

Ownership: the tree holds exactly one pool reference per block it stores. Blocks
returned by ``match`` and ``insert`` are borrowed: valid while the caller holds a
lock on a node whose path covers them. Eviction takes unlocked leaves in LRU order
(a min-heap of evictable leaves keyed by last-use tick, stale entries skipped
lazily) and trims a leaf from its end, so a prefix never goes before its suffix.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from chunking.hashing import (
    TOKEN_DTYPE,
    as_token_array,
    chunk_hashes,
    common_prefix_length,
    root_seed,
)
from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.events import CacheEvents
from prefixcache.cache.radix_integrity import check_tree
from prefixcache.cache.radix_node import (
    CacheStats,
    EvictedRun,
    InsertResult,
    MatchResult,
    RootNode,
    TreeNode,
    is_evictable,
)
from prefixcache.cache.tenants import salt_tenant

__all__ = ["CacheStats", "EvictedRun", "InsertResult", "MatchResult", "RadixCache", "TreeNode"]


class RadixCache:
    """Prefix cache of KV blocks from ``pool``, matched at ``block_size`` granularity.

    ``chunk_size`` (a multiple of ``block_size``) is the hash chunk; ``fingerprint``
    names the model and seeds every chain. ``on_evict(run: EvictedRun)`` is called
    before evicted blocks are freed. ``events`` records full chunks entering the tree
    and leaving it (unless ``on_evict`` takes them: it then decides where they went).
    """

    def __init__(
        self,
        pool: BlockPool,
        block_size: int = 16,
        chunk_size: int = 256,
        fingerprint: str = "",
        on_evict: Callable[[EvictedRun], None] | None = None,
        events: CacheEvents | None = None,
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % block_size:
            raise ValueError(
                f"chunk_size must be a positive multiple of block_size ({block_size}), "
                f"got {chunk_size!r}"
            )
        self.pool = pool
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.fingerprint = fingerprint
        self.on_evict = on_evict
        self.events = events
        self.stats = CacheStats()
        self._roots: dict[str | None, RootNode] = {}
        self._heap: list[tuple[int, int, TreeNode]] = []  # (last_used, seq, leaf)
        self._seq = self._tick = 0
        self._num_cached = self._num_locked = self._num_nodes = 0

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the tree holds a reference on."""
        return self._num_cached

    @property
    def num_locked_blocks(self) -> int:
        """Cached blocks on some locked path: they cannot be evicted."""
        return self._num_locked

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks that ``evict`` could free now."""
        return self._num_cached - self._num_locked

    def match(
        self, token_ids: Sequence[int] | np.ndarray, salt: str | None = None, count: bool = True
    ) -> MatchResult:
        """Find the longest cached prefix of ``token_ids`` in whole blocks and lock it.

        Every token is verified against the stored ones. The path root..node is locked
        (call ``unlock(result.node)`` when done) and its blocks are borrowed, not
        referenced: the returned list may be the tree's own, so copy it before changing
        it. Nothing cached gives ``num_tokens == 0`` and the salt's root. ``count``:
        add to the query and hit counters (False for a request's repeated lookups, and
        for pins, so each request's prompt is counted once).
        """
        tokens = as_token_array(token_ids)
        path, num_tokens = self._walk(self._root(salt), tokens)
        self.lock(path[-1])
        self._touch(path)
        if count:
            self.stats.query_tokens += len(tokens)
            self.stats.hit_tokens += num_tokens
        return MatchResult(num_tokens, _path_blocks(path, borrow=True), path[-1])

    def peek(self, token_ids: Sequence[int] | np.ndarray, salt: str | None = None) -> int:
        """How many leading tokens ``match`` would find, without locking, splitting,
        touching or counting anything (for scheduling decisions)."""
        root = self._roots.get(salt)
        if root is None:
            return 0
        return self._descend(root, as_token_array(token_ids))[1]

    def insert(
        self,
        token_ids: Sequence[int] | np.ndarray,
        block_ids: Sequence[int],
        salt: str | None = None,
    ) -> InsertResult:
        """Cache ``token_ids`` (whole blocks) held in ``block_ids``; one reference each moves in.

        Where the tree already holds a block for a position, a passed block with a
        different id is a duplicate and is released to the pool; use the returned
        ``block_ids`` instead. The returned node is not locked.
        """
        tokens, block_ids = as_token_array(token_ids), list(block_ids)
        self._check_insert_lengths(tokens, block_ids)
        root = self._root(salt)
        path, num_tokens = self._walk(root, tokens)
        tree_ids = _path_blocks(path)
        duplicates = self._check_insert_blocks(block_ids, tree_ids)
        done = len(tree_ids)
        if done < len(block_ids):
            path.append(self._add_suffix(path, tokens, block_ids[done:], num_tokens))
        self._touch(path)
        if duplicates:
            self.pool.free(duplicates)
        return InsertResult(num_tokens, tree_ids + block_ids[done:], path[-1])

    def lock(self, node: TreeNode) -> None:
        """Protect the path root..node from eviction (nested locks count)."""
        _check_attached(node)
        while node is not None:
            if node.lock_ref == 0:
                self._num_locked += len(node.block_ids)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one ``lock(node)``; raises ``ValueError`` if ``node`` is not locked."""
        _check_attached(node)
        if node.lock_ref <= 0:
            raise ValueError("unlock of a node that is not locked")
        while True:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._num_locked -= len(node.block_ids)
                self._push_if_evictable(node)
            if node.parent is None:
                break
            node = node.parent
        self._drop_root_if_empty(node)

    def evict(self, num_blocks: int) -> int:
        """Free at least ``num_blocks`` blocks if possible, LRU unlocked leaves first.

        Leaves are trimmed from their end one block at a time, so freeing one block
        never throws away a long run. Returns how many blocks were freed.
        """
        freed = 0
        while freed < num_blocks:
            leaf = self._lru_leaf()
            if leaf is None:
                break
            freed += self._trim(leaf, num_blocks - freed, notify=True)
        self.stats.evicted_blocks += freed
        return freed

    def flush(self, tenant: str | None = None) -> int:
        """Drop every unlocked cached block (``on_evict`` is not called); return how many.

        With ``tenant``, only the trees of salts that belong to it (``salt_tenant``).
        """
        freed = 0
        if tenant is None:
            while (leaf := self._lru_leaf()) is not None:
                freed += self._trim(leaf, len(leaf.block_ids), notify=False)
            return freed
        for salt, root in list(self._roots.items()):
            if salt_tenant(salt) == tenant:
                freed += self._flush_tree(root)
        return freed

    def _flush_tree(self, root: RootNode) -> int:
        """Drop the unlocked leaves of one tree, children before their parents (so a
        parent left without children goes too)."""
        order, stack = [], [root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack += node.children.values()
        freed = 0
        for node in reversed(order):  # every child comes after its parent in ``order``
            if is_evictable(node):
                freed += self._trim(node, len(node.block_ids), notify=False)
        return freed

    def reset(self) -> None:
        """Drop everything; raises ``RuntimeError`` if any path is still locked."""
        if any(root.lock_ref for root in self._roots.values()):
            raise RuntimeError("reset() while nodes are locked")
        block_ids = []
        for node in self._iter_nodes():
            block_ids += node.block_ids
            node.attached = False
        self.pool.free(block_ids)
        self._roots.clear()
        self._heap.clear()
        if self.events is not None:
            self.events.on_device.clear()
        self._num_cached = self._num_locked = self._num_nodes = 0
        self.stats = CacheStats()

    def check_integrity(self, num_held_outside: int = 0) -> None:
        """Raise ``AssertionError`` unless the tree, its counters and the pool agree.

        ``num_held_outside``: blocks allocated from the pool that the tree does not
        hold (a running sequence's own blocks); at rest it is 0.
        """
        check_tree(self, num_held_outside)

    # -- walking and growing the tree -------------------------------------------------

    def _root(self, salt: str | None) -> RootNode:
        root = self._roots.get(salt)
        if root is None:
            seed = root_seed(self.fingerprint, salt)
            root = RootNode(None, 0, np.empty(0, TOKEN_DTYPE), [], [], salt=salt, seed=seed)
            self._roots[salt] = root
        return root

    def _walk(self, root: RootNode, tokens: np.ndarray) -> tuple[list[TreeNode], int]:
        """Follow ``tokens`` down in whole blocks; split so the path ends at the match."""
        path, pos, partial = self._descend(root, tokens)
        if partial is not None:
            path.append(self._split(*partial))
        return path, pos

    def _descend(self, root: RootNode, tokens: np.ndarray):
        """Read-only walk: nodes matched whole, tokens matched, and (node, tokens) of a
        node the match ends inside, if any."""
        bs = self.block_size
        limit = len(tokens) // bs * bs
        path: list[TreeNode] = [root]
        node, pos = root, 0
        while pos < limit:
            child = node.children.get(tokens[pos : pos + bs].tobytes())
            if child is None:
                break
            size = min(len(child.tokens), limit - pos)
            same = common_prefix_length(child.tokens[:size], tokens[pos : pos + size]) // bs * bs
            pos += same
            if same < len(child.tokens):  # diverges or ends inside: same >= bs here
                return path, pos, (child, same)
            path.append(child)
            node = child
        return path, pos, None

    def _split(self, node: TreeNode, size: int) -> TreeNode:
        """Cut ``node`` after ``size`` tokens; the new head goes above, ``node`` keeps the tail.

        ``node`` stays the same object (its locks, LRU entry and holders stay valid);
        the head inherits the lock count, since every lock below passes through it.
        """
        bs, cs = self.block_size, self.chunk_size
        num_hashes = (node.start + size) // cs - node.start // cs
        key = node.tokens[:bs].tobytes()
        head = TreeNode(
            node.parent,
            node.start,
            node.tokens[:size],
            node.block_ids[: size // bs],
            node.hashes[:num_hashes],
            lock_ref=node.lock_ref,
            last_used=node.last_used,
        )
        node.parent.children[key] = head
        node.parent, node.start, node.tokens = head, node.start + size, node.tokens[size:]
        node.block_ids, node.hashes = node.block_ids[size // bs :], node.hashes[num_hashes:]
        head.children[node.tokens[:bs].tobytes()] = node
        self._num_nodes += 1
        return head

    def _add_suffix(
        self, path: list[TreeNode], tokens: np.ndarray, block_ids: list[int], pos: int
    ) -> TreeNode:
        """Store ``tokens[pos:]`` below ``path[-1]``: extend it if it is an unlocked leaf."""
        cs = self.chunk_size
        first_chunk = pos // cs
        hashes = chunk_hashes(tokens[first_chunk * cs :], cs, self._chain_seed(path, first_chunk))
        parent = path[-1]
        self._num_cached += len(block_ids)
        if self.events is not None:
            self.events.device_added(path[0].salt, hashes)
        if parent.parent is not None and not parent.children and not parent.lock_ref:
            parent.tokens = np.concatenate((parent.tokens, tokens[pos:]))
            parent.block_ids += block_ids
            parent.hashes += hashes
            return parent  # already on the path; _touch re-queues it with its new tick
        child = TreeNode(parent, pos, tokens[pos:].copy(), block_ids, hashes)
        parent.children[tokens[pos : pos + self.block_size].tobytes()] = child
        self._num_nodes += 1
        return child

    def _chain_seed(self, path: list[TreeNode], chunk: int) -> int:
        """The seed of ``chunk``: the hash of the chunk before it, found on ``path``."""
        if chunk == 0:
            return path[0].seed
        boundary = chunk * self.chunk_size
        node = next(n for n in reversed(path) if n.start < boundary <= n.end)
        return node.hashes[chunk - 1 - node.start // self.chunk_size]

    def _touch(self, path: list[TreeNode]) -> None:
        self._tick += 1
        for node in path:
            node.last_used = self._tick
        self._push_if_evictable(path[-1])

    # -- eviction ---------------------------------------------------------------------

    def _push_if_evictable(self, node: TreeNode) -> None:
        if node.parent is None or node.lock_ref or node.children:
            return
        self._seq += 1
        node.heap_seq = self._seq
        heapq.heappush(self._heap, (node.last_used, self._seq, node))
        if len(self._heap) > 2 * self._num_nodes + 64:  # drop stale entries, amortized O(1)
            self._heap = [e for e in self._heap if e[1] == e[2].heap_seq and is_evictable(e[2])]
            heapq.heapify(self._heap)

    def _lru_leaf(self) -> TreeNode | None:
        """The least recently used unlocked leaf (left in the heap), or None."""
        heap = self._heap
        while heap:
            _, seq, leaf = heap[0]
            if seq == leaf.heap_seq and is_evictable(leaf):
                return leaf
            heapq.heappop(heap)
        return None

    def _trim(self, leaf: TreeNode, max_blocks: int, notify: bool) -> int:
        """Free up to ``max_blocks`` blocks from the end of ``leaf``; remove it when empty."""
        keep = max(len(leaf.block_ids) - max_blocks, 0)
        offloaded = notify and self.on_evict is not None
        if offloaded:
            self.on_evict(self._evicted_run(leaf, keep))
        freed = leaf.block_ids[keep:]
        first_gone = (leaf.start + keep * self.block_size) // self.chunk_size
        gone = leaf.hashes[first_gone - leaf.start // self.chunk_size :]
        if gone and self.events is not None:
            self.events.device_dropped(gone)
            if not offloaded and self.events.enabled:
                self.events.record("evicted", _root_of(leaf).salt, reversed(gone))
        if keep:
            leaf.tokens = leaf.tokens[: keep * self.block_size]
            del leaf.block_ids[keep:]
            del leaf.hashes[len(leaf.hashes) - len(gone) :]
        else:
            self._remove_leaf(leaf)
        self._num_cached -= len(freed)
        self.pool.free(freed)  # the tree's one reference on each
        return len(freed)

    def _remove_leaf(self, leaf: TreeNode) -> None:
        parent = leaf.parent
        del parent.children[leaf.tokens[: self.block_size].tobytes()]
        leaf.parent, leaf.attached = None, False
        self._num_nodes -= 1
        self._push_if_evictable(parent)
        self._drop_root_if_empty(parent)

    def _drop_root_if_empty(self, node: TreeNode) -> None:
        empty = isinstance(node, RootNode) and not node.children and not node.lock_ref
        if empty and self._roots.get(node.salt) is node:
            del self._roots[node.salt]
            node.attached = False

    def _evicted_run(self, leaf: TreeNode, keep: int) -> EvictedRun:
        """Describe the blocks after the first ``keep`` of ``leaf``, from their chunk start."""
        cs = self.chunk_size
        cut = leaf.start + keep * self.block_size
        start = cut // cs * cs
        pieces, blocks, node = [], [], leaf
        while node.start > start:  # at most chunk_size / block_size ancestors
            pieces.append(node.tokens)
            blocks.append(node.block_ids)
            node = node.parent
        pieces.append(node.tokens[start - node.start :])
        blocks.append(node.block_ids[(start - node.start) // self.block_size :])
        if start == 0:
            seed = _root_of(node).seed
        else:
            node = node if node.start < start else node.parent
            seed = node.hashes[start // cs - 1 - node.start // cs]
        num_hashes = leaf.end // cs - cut // cs
        hashes = leaf.hashes[len(leaf.hashes) - num_hashes :]
        tokens = np.concatenate(pieces[::-1])
        head = [b for ids in blocks[::-1] for b in ids][: (cut - start) // self.block_size]
        salt = _root_of(leaf).salt if self.events is not None and self.events.enabled else None
        return EvictedRun(seed, start, tokens, leaf.block_ids[keep:], hashes, head, salt)

    # -- checks -----------------------------------------------------------------------

    def _check_insert_lengths(self, tokens: np.ndarray, block_ids: list[int]) -> None:
        if len(tokens) != len(block_ids) * self.block_size:
            raise ValueError(
                f"insert needs len(token_ids) == len(block_ids) * block_size, got "
                f"{len(tokens)} tokens for {len(block_ids)} blocks of {self.block_size}"
            )

    def _check_insert_blocks(self, block_ids: list[int], tree_ids: list[int]) -> list[int]:
        """Passed blocks must be distinct and allocated; returns the duplicates (passed
        where the tree already holds another block). Those equal to the tree's own at
        their position are known good, so a sequence extending its cached prefix by a
        block pays for that block, not for the whole prefix."""
        done = len(tree_ids)
        duplicates = []
        if block_ids[:done] != tree_ids:
            pairs = zip(block_ids, tree_ids, strict=False)
            duplicates = [mine for mine, tree in pairs if mine != tree]
        others = duplicates + block_ids[done:]
        if not others:
            return duplicates
        if len(set(others)) != len(others) or not set(others).isdisjoint(tree_ids):
            raise ValueError("insert got the same block id twice")
        for block_id in others:
            if self.pool.ref_count(block_id) == 0:
                raise ValueError(f"insert got block {block_id}, which is free in the pool")
        return duplicates

    def _iter_nodes(self) -> Iterator[TreeNode]:
        stack: list[TreeNode] = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack += node.children.values()


def _path_blocks(path: list[TreeNode], borrow: bool = False) -> list[int]:
    """Block ids along ``path``. With ``borrow``, a path of one node below its root
    returns that node's own list, uncopied: callers of ``match`` hold a lock on it,
    and a locked node's list is never changed in place (splits make new lists)."""
    if borrow and len(path) == 2:
        return path[1].block_ids
    block_ids: list[int] = []
    for node in path:
        block_ids += node.block_ids
    return block_ids


def _root_of(node: TreeNode) -> RootNode:
    while node.parent is not None:
        node = node.parent
    return node


def _check_attached(node: TreeNode) -> None:
    if not node.attached:
        raise ValueError("node is no longer in the cache (evicted, flushed or reset)")
