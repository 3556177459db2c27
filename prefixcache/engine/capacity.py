"""How much KV cache a request could ever hold: the pool less what pins keep.

Blocks locked by running requests come back when those finish; pinned blocks come
back only when unpinned. So a request whose prompt plus ``max_tokens`` needs more
blocks than the pool minus the pinned blocks (those on its own prefix are shared, not
taken from it) can never run while the pins stay. Admitting it anyway leaves it
preempting itself and re-admitting in a loop, or blocking the queue: it is refused.
"""

from __future__ import annotations

import numpy as np

from chunking.hashing import common_prefix_length
from prefixcache.cache.block_manager import BlockManager
from prefixcache.cache.pins import PinRegistry
from prefixcache.cache.radix_node import TreeNode
from prefixcache.engine.errors import KVCacheExhaustedError
from prefixcache.engine.sequence import Sequence


class KVCapacity:
    """Checks requests against the blocks they could ever get (``pins`` None: no pins)."""

    def __init__(self, blocks: BlockManager, pins: PinRegistry | None) -> None:
        self.blocks = blocks
        self.pins = pins

    def usable_blocks(self, prompt: np.ndarray, salt: str | None) -> int:
        """Blocks a request with ``prompt`` could hold once every other request is done."""
        total = self.blocks.pool.num_blocks
        if self.pins is None or not len(self.pins):
            return total
        paths = [_path(node) for node in self.pins.nodes()]
        pinned = {id(node): len(node.block_ids) for path in paths for node in path}
        # The lookup matches all but the last prompt token, so only that much is shared.
        looked_up = prompt[: len(prompt) - 1]
        shared = max(_shared_tokens(path, looked_up, salt) for path in paths)
        return total - sum(pinned.values()) + shared // self.blocks.block_size

    def check(self, seq: Sequence) -> None:
        """Raise ``KVCacheExhaustedError`` if ``seq`` can never get the blocks it needs."""
        self.check_prompt(seq.prompt, seq.params.max_tokens, seq.salt)

    def check_prompt(self, prompt: np.ndarray, max_tokens: int, salt: str | None) -> None:
        """``check`` for a request not made yet: ``prompt`` ids, ``max_tokens``, ``salt``."""
        block_size = self.blocks.block_size
        needed = len(prompt) + max_tokens
        usable = self.usable_blocks(prompt, salt)
        if self.blocks.blocks_for(needed) > usable:
            pool = self.blocks.pool.num_blocks * block_size
            raise KVCacheExhaustedError(needed, usable * block_size, pool)


def _path(node: TreeNode) -> list[TreeNode]:
    """The nodes from the root (first) down to ``node``."""
    path = []
    while node is not None:
        path.append(node)
        node = node.parent
    return path[::-1]


def _shared_tokens(path: list[TreeNode], tokens: np.ndarray, salt: str | None) -> int:
    """Leading ``tokens`` (whole blocks) that the pinned ``path`` holds under ``salt``."""
    if path[0].salt != salt:
        return 0
    shared = 0
    for node in path[1:]:
        piece = tokens[node.start : node.end]
        same = common_prefix_length(node.tokens[: len(piece)], piece)
        shared += same
        if same < len(node.tokens):
            break
    return shared
