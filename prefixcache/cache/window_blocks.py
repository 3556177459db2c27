"""KV blocks of the sliding-window layers in a hybrid KV cache.

Global layers keep a block for every token (the block manager's pool and radix tree).
Sliding-window layers write the same positions into blocks of their own, smaller pool:
a sequence keeps only the blocks its window can still see, and returns the others to
the pool as it advances. So the local layers of a long context cost a window, not the
context.

Block j of a sequence holds positions ``j*bs .. (j+1)*bs - 1`` in every layer; the
sequence's local table ``seq.local_block_ids`` is aligned with ``seq.block_ids`` and
holds ``-1`` where a block was released. Released entries are always a prefix of the
table: blocks go in order, oldest first.

Prefix cache: the tree stores global blocks. For a cached global block it may also
remember the local block of the same position (``_local_of``, keyed by the global
block id, in least-recently-used order). A cached prefix is reusable up to position p
only where every local layer still has the keys its next query reads, positions
``p-W+1 .. p-1``: ``reusable_blocks`` cuts a match back to the last such point, so
hit equals miss. Remembered blocks are dropped oldest first when the local pool runs
short, and whenever the tree lets go of their global block.

Ownership: a local block's pool references are one per sequence holding it in its
table, plus one if the tree remembers it. It goes back to the pool when the last of
these is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from prefixcache.cache.block_pool import BlockPool

RELEASED = -1


class WindowBlocks:
    """The local layers' pool and the tables of the sequences that use it.

    ``window``: the largest sliding window of the model's local layers, in tokens.
    """

    def __init__(self, num_blocks: int, block_size: int, window: int) -> None:
        if window < 1:
            raise ValueError(f"sliding window must be at least 1 token, got {window}")
        self.pool = BlockPool(num_blocks)
        self.block_size, self.window = block_size, window
        self._local_of: OrderedDict[int, int] = OrderedDict()  # global id -> local id
        self.num_forgotten = 0  # remembered blocks dropped to make room, since creation

    @property
    def num_remembered(self) -> int:
        """Local blocks the prefix cache remembers (one pool reference each)."""
        return len(self._local_of)

    def first_needed_block(self, position: int) -> int:
        """The first block a query at ``position`` reads in a local layer."""
        return max(0, position - self.window + 1) // self.block_size

    def max_blocks_per_step(self, num_tokens: int) -> int:
        """Local blocks one sequence holds while computing ``num_tokens`` at once."""
        return -(-(self.window - 1 + num_tokens) // self.block_size) + 1

    # -- the prefix cache's side --------------------------------------------------------

    def reusable_blocks(self, global_ids: Sequence[int]) -> int:
        """How many of the matched ``global_ids`` can be reused: the largest q such that
        the local blocks a query at ``q*bs`` reads are all remembered."""
        q = len(global_ids)
        while q > 0:
            first = self.first_needed_block(q * self.block_size)
            missing = self._last_missing(global_ids, first, q)
            if missing is None:
                return q
            q = missing  # a point past a missing block would read it
        return 0

    def _last_missing(self, global_ids: Sequence[int], first: int, end: int) -> int | None:
        for j in range(end - 1, first - 1, -1):
            if global_ids[j] not in self._local_of:
                return j
        return None

    def adopt(self, seq, global_ids: Sequence[int]) -> None:
        """Give ``seq`` (which reuses ``global_ids``) the remembered local blocks its next
        query reads, one reference each; the blocks before them are released."""
        q = len(global_ids)
        first = self.first_needed_block(q * self.block_size) if q else 0
        local = [self._local_of[g] for g in global_ids[first:q]]
        self.pool.incref(local)
        for g in global_ids[first:q]:
            self._local_of.move_to_end(g)
        seq.local_block_ids = [RELEASED] * first + local

    def remember(self, seq, cached_global_ids: Sequence[int]) -> None:
        """After ``seq``'s first blocks went into the tree as ``cached_global_ids``: let
        the tree remember the local blocks ``seq`` still holds for them."""
        local_ids = seq.local_block_ids
        end = min(len(cached_global_ids), len(local_ids))
        for j in range(_first_held(local_ids), end):
            g = cached_global_ids[j]
            if g in self._local_of:
                self._local_of.move_to_end(g)
                continue
            self.pool.incref([local_ids[j]])
            self._local_of[g] = local_ids[j]

    def forget(self, global_ids: Iterable[int]) -> None:
        """The tree let go of ``global_ids``: drop what it remembered for them."""
        dropped = [self._local_of.pop(g) for g in global_ids if g in self._local_of]
        if dropped:
            self.pool.free(dropped)

    def forget_all(self) -> int:
        """Drop everything remembered; returns how many blocks that was."""
        dropped = list(self._local_of.values())
        self._local_of.clear()
        self.pool.free(dropped)
        return len(dropped)

    # -- the sequences' side ------------------------------------------------------------

    def allocate(self, seq, num_tokens: int) -> bool:
        """Local blocks for positions up to ``seq.num_computed_tokens + num_tokens``; False
        (and nothing changed) when the pool cannot give them even after forgetting."""
        self.release_behind(seq)
        end = seq.num_computed_tokens + num_tokens
        needed = -(-end // self.block_size) - len(seq.local_block_ids)
        if needed <= 0:
            return True
        if self.pool.num_free < needed:
            self._forget_oldest(needed - self.pool.num_free)
        if self.pool.num_free < needed:
            return False
        seq.local_block_ids += self.pool.allocate(needed)
        return True

    def release_behind(self, seq) -> None:
        """Return the blocks no later query of ``seq`` reads (behind its window)."""
        table = seq.local_block_ids
        first = min(self.first_needed_block(seq.num_computed_tokens), len(table))
        start = _first_held(table)
        if start < first:
            self.pool.free(table[start:first])
            table[start:first] = [RELEASED] * (first - start)

    def free(self, seq) -> None:
        """Drop every local block ``seq`` holds."""
        table = seq.local_block_ids
        self.pool.free(table[_first_held(table) :])
        seq.local_block_ids = []

    def _forget_oldest(self, count: int) -> None:
        """Forget remembered blocks, least recently used first, until ``count`` blocks are
        back in the pool or nothing is remembered."""
        freed = 0
        while freed < count and self._local_of:
            _, local = self._local_of.popitem(last=False)
            before = self.pool.num_free
            self.pool.free([local])
            freed += self.pool.num_free - before
            self.num_forgotten += 1

    def check_integrity(self, seqs: Iterable, global_pool: BlockPool) -> None:
        """Raise ``AssertionError`` unless every pool reference is accounted for and
        every remembered block belongs to a global block still held."""
        held: dict[int, int] = {}
        for g in self._local_of:
            _require(global_pool.ref_count(g) > 0, f"remembers free global block {g}")
        for local in self._local_of.values():
            held[local] = held.get(local, 0) + 1
        _require(len(held) == len(self._local_of), "one local block remembered twice")
        for seq in seqs:
            table = seq.local_block_ids
            start = _first_held(table)
            _require(RELEASED not in table[start:], f"{seq.request_id}: hole in local table")
            for local in table[start:]:
                held[local] = held.get(local, 0) + 1
        for block in range(self.pool.num_blocks):
            refs = self.pool.ref_count(block)
            _require(refs == held.get(block, 0), f"local block {block}: {refs} references")


def _first_held(table: list[int]) -> int:
    """Index of the first block still held (released ones are a prefix)."""
    lo, hi = 0, len(table)
    while lo < hi:  # binary search: a long context has a long released prefix
        mid = (lo + hi) // 2
        if table[mid] == RELEASED:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
