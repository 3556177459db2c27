"""A pool of KV block ids with reference counts.

A block is free (reference count 0, on the free list) or allocated (count >= 1).
Whoever holds a reference may read and write the block's KV; the block returns to the
free list when its last reference is dropped. The radix cache holds one reference per
block it stores; a running sequence holds one per block it owns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class NoFreeBlocksError(ValueError):
    """Raised by ``BlockPool.allocate`` when fewer blocks are free than asked for."""

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"asked for {requested} KV blocks but only {available} are free")
        self.requested = requested
        self.available = available


class BlockPool:
    """``num_blocks`` KV block ids (0 .. num_blocks-1) handed out with reference counts.

    ``allocate`` and ``free`` cost O(1) per block. Every method checks its whole input
    before changing anything, so a bad call raises ``ValueError`` and changes no state.
    """

    __slots__ = ("_num_blocks", "_ref_counts", "_free", "on_release")

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative integer, got {num_blocks!r}")
        self._num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # A stack: allocate pops from the end, so a fresh pool hands out 0, 1, 2, ...
        self._free = list(range(num_blocks - 1, -1, -1))
        # Called with the ids a ``free`` returned to the pool (whatever was attached to
        # them, like a hybrid cache's local blocks, is stale from then on).
        self.on_release: Callable[[list[int]], None] | None = None

    @property
    def num_blocks(self) -> int:
        """Total number of blocks in the pool."""
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks with no reference, ready to allocate."""
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        """References held on ``block_id`` (0 when it is free)."""
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with one reference; allocate nothing if too few are free."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"number of blocks to allocate must be >= 0, got {n!r}")
        if n > len(self._free):
            raise NoFreeBlocksError(n, len(self._free))
        if n == 0:
            return []
        block_ids = self._free[-n:]
        del self._free[-n:]
        block_ids.reverse()
        refs = self._ref_counts
        for block_id in block_ids:
            refs[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each allocated block (a block may appear more than once)."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            if self.ref_count(block_id) == 0:
                raise ValueError(f"cannot incref block {block_id}: it is free")
        refs = self._ref_counts
        for block_id in block_ids:
            refs[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 becomes free.

        Dropping more references than a block holds (freeing a free block) raises
        ``ValueError`` and leaves every count as it was.
        """
        refs = self._ref_counts
        done: list[int] = []
        released: list[int] = []
        for block_id in block_ids:
            if self.ref_count(block_id) == 0:
                self._undo_free(done)
                raise ValueError(f"cannot free block {block_id}: it is already free")
            refs[block_id] -= 1
            if refs[block_id] == 0:
                released.append(block_id)
            done.append(block_id)
        # Highest id deepest: the next allocation of these blocks comes out ascending,
        # so a sequence's blocks form runs that attention reads as one strided view.
        released.sort(reverse=True)
        self._free.extend(released)
        if released and self.on_release is not None:
            self.on_release(released)

    def _undo_free(self, done: list[int]) -> None:
        """Restore the counts a failed ``free`` dropped (nothing reached the free list)."""
        refs = self._ref_counts
        for block_id in done:
            refs[block_id] += 1

    def _check_id(self, block_id: int) -> None:
        if not isinstance(block_id, int) or not 0 <= block_id < self._num_blocks:
            raise ValueError(f"block id {block_id!r} is not in the pool of {self._num_blocks}")
