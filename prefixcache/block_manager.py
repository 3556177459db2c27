"""KV blocks for sequences: fresh ones from the pool, shared ones from the prefix cache."""

from __future__ import annotations

from prefixcache.block_pool import BlockPool
from prefixcache.radix_cache import RadixCache
from prefixcache.sequence import Sequence


class BlockManager:
    """Gives sequences the blocks they need, reusing cached prefixes when enabled.

    Invariant: every pool reference is held either by the radix cache (one per cached
    block) or by exactly one sequence (its blocks past ``num_locked_blocks``).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        chunk_size: int,
        fingerprint: str,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.cache = (
            RadixCache(self.pool, block_size, chunk_size, fingerprint)
            if enable_prefix_caching
            else None
        )

    @property
    def num_available_blocks(self) -> int:
        """Blocks that can be handed out now: free ones plus evictable cached ones."""
        evictable = self.cache.num_evictable_blocks if self.cache else 0
        return self.pool.num_free + evictable

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """How many tokens of ``seq`` a ``match_prefix`` would reuse now (changes nothing)."""
        if self.cache is None:
            return 0
        return self.cache.peek(seq.token_array(seq.num_tokens - 1), seq.salt)

    def match_prefix(self, seq: Sequence) -> None:
        """Borrow the longest cached prefix of ``seq`` (all but its last token) and lock it."""
        if self.cache is None or seq.block_ids:
            return
        result = self.cache.match(seq.token_array(seq.num_tokens - 1), seq.salt)
        seq.block_ids = list(result.block_ids)
        seq.num_locked_blocks = len(result.block_ids)
        seq.cache_node = result.node
        seq.num_computed_tokens = result.num_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens; False (and no change) if full."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if needed <= 0:
            return True
        if self.pool.num_free < needed and self.cache is not None:
            self.cache.evict(needed - self.pool.num_free)
        if self.pool.num_free < needed:
            return False
        seq.block_ids.extend(self.pool.allocate(needed))
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Insert the full blocks ``seq`` has computed, so other requests can share them."""
        num_full = seq.num_computed_tokens // self.block_size
        if self.cache is None or num_full <= seq.num_locked_blocks:
            return
        tokens = seq.token_array(num_full * self.block_size)
        result = self.cache.insert(tokens, seq.block_ids[:num_full], seq.salt)
        # The cache now owns these blocks (duplicates were released): hold them by lock.
        self.cache.lock(result.node)
        self._unlock(seq)
        seq.block_ids[:num_full] = result.block_ids
        seq.num_locked_blocks = num_full
        seq.cache_node = result.node

    def free(self, seq: Sequence, cache_blocks: bool = True) -> None:
        """Release every block of ``seq``; computed full blocks go to the cache first."""
        if cache_blocks:
            self.cache_computed_blocks(seq)
        self.pool.free(seq.block_ids[seq.num_locked_blocks :])
        self._unlock(seq)
        seq.block_ids = []
        seq.num_locked_blocks = 0

    def _unlock(self, seq: Sequence) -> None:
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
            seq.cache_node = None
