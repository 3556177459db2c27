"""KV blocks for sequences: fresh ones from the pool, shared ones from the prefix cache,
and ones brought back from the tiers behind it."""

from __future__ import annotations

from dataclasses import dataclass

from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.events import CacheEvents
from prefixcache.cache.radix_cache import RadixCache
from prefixcache.cache.radix_node import EvictedRun
from prefixcache.engine.sequence import Sequence
from prefixcache.tiers.chunk_chains import ChunkChains
from prefixcache.tiers.tiered import TieredCache


@dataclass(slots=True)
class _SeqChunks:
    """A sequence's chunk names, built once per chunk, and how many whole chunks were
    handed to the tiers as computed."""

    chains: ChunkChains
    persisted: int = 0


RESERVED_OUTPUT_TOKENS = 64  # output slots taken with a prompt's blocks, to keep them adjacent


class BlockManager:
    """Gives sequences the blocks they need, reusing cached prefixes when enabled.

    Invariant: every pool reference is held either by the radix cache (one per cached
    block) or by exactly one sequence (its blocks past ``num_locked_blocks``). Blocks
    onloaded from a lower tier go straight into the cache, so the same holds for them.

    With tiers, every block the cache holds has its chunk's parent digest (the digest
    of the whole prefix before the chunk) in ``_parents``, set whenever blocks are
    inserted, so evicted blocks can be named exactly although an ``EvictedRun`` does
    not carry the tokens before its first chunk.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        chunk_size: int,
        fingerprint: str,
        enable_prefix_caching: bool = True,
        tiers: TieredCache | None = None,
        events: CacheEvents | None = None,
    ) -> None:
        self.block_size, self.chunk_size = block_size, chunk_size
        self.events = events if events is not None else CacheEvents()
        self.fingerprint = fingerprint
        self.pool = BlockPool(num_blocks)
        self.tiers = tiers if enable_prefix_caching else None
        on_evict = self._offload if self.tiers is not None else None
        self.cache = (
            RadixCache(self.pool, block_size, chunk_size, fingerprint, on_evict, self.events)
            if enable_prefix_caching
            else None
        )
        self._chunks: dict[Sequence, _SeqChunks] = {}
        self._parents: list[bytes | None] = [None] * num_blocks if self.tiers else []

    @property
    def num_available_blocks(self) -> int:
        """Blocks that can be handed out now: free ones plus evictable cached ones."""
        evictable = self.cache.num_evictable_blocks if self.cache else 0
        return self.pool.num_free + evictable

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """How many tokens of ``seq`` the device cache would reuse now (changes nothing)."""
        if self.cache is None:
            return 0
        return self.cache.peek(seq.token_array(seq.num_tokens - 1), seq.salt)

    def match_prefix(self, seq: Sequence) -> None:
        """Borrow the longest cached prefix of ``seq`` (all but its last token) and lock it.

        The device match is extended with blocks found in the tiers: they are copied
        into fresh device blocks and inserted into the cache first. Only a request's
        first lookup is counted as a query and its hits: a request looked up again
        (waiting for room, or preempted) is the same request, not more traffic.
        """
        if self.cache is None or seq.block_ids:
            return
        count = not seq.lookup_counted
        seq.lookup_counted = True
        tokens = seq.token_array(seq.num_tokens - 1)
        result = self.cache.match(tokens, seq.salt, count=count)
        seq.block_ids = list(result.block_ids)
        seq.num_locked_blocks = len(result.block_ids)
        seq.cache_node = result.node
        seq.num_computed_tokens = result.num_tokens
        if self.tiers is not None:
            self._onload(seq, count)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens; False (and no change) if full."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if needed <= 0:
            return True
        block_ids = self._reserve(seq, needed) or self._take_blocks(needed)
        if block_ids is None:
            return False
        seq.block_ids.extend(block_ids)
        return True

    def _reserve(self, seq: Sequence, needed: int) -> list[int] | None:
        """On a prompt's first chunk, blocks for the whole prompt and its first output
        tokens at once, so they are consecutive and attention reads them as one view.

        Only free blocks are used (nothing is evicted for it) and only while plenty stay
        free for everyone else; otherwise None and blocks come chunk by chunk.
        """
        if seq.num_output_tokens or len(seq.block_ids) > seq.num_locked_blocks:
            return None  # decoding, or a later chunk: its prompt blocks are already out
        outputs = min(seq.params.max_tokens, RESERVED_OUTPUT_TOKENS)
        wanted = self.blocks_for(seq.num_tokens + outputs) - len(seq.block_ids)
        if wanted <= needed or self.pool.num_free - wanted < self.pool.num_blocks // 8:
            return None
        return self.pool.allocate(wanted)

    def cache_computed_blocks(self, seq: Sequence, finished: bool = False) -> None:
        """Insert the full blocks ``seq`` has computed, so other requests can share them.

        ``finished``: ``seq`` computes nothing more (it ends or is preempted), so the
        tiers may take its partial last chunk too.
        """
        if self.cache is None:
            return
        self._insert_computed(seq)
        if self.tiers is not None:
            self._write_through(seq, finished)

    def _insert_computed(self, seq: Sequence) -> None:
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_locked_blocks:
            return
        tokens = seq.token_array(num_full * self.block_size)
        # Unlock first: with no other holder the tree then extends this sequence's node
        # in place rather than chaining a new node below it, so a conversation stays a
        # few nodes long, not one per turn. Nothing can evict between these calls.
        self._unlock(seq)
        result = self.cache.insert(tokens, seq.block_ids[:num_full], seq.salt)
        # The cache now owns these blocks (duplicates were released): hold them by lock.
        self.cache.lock(result.node)
        first_new = seq.num_locked_blocks
        seq.block_ids[:num_full] = result.block_ids
        seq.num_locked_blocks = num_full
        seq.cache_node = result.node
        if self.tiers is not None:
            self._name_blocks(seq, first_new, num_full)

    def free(self, seq: Sequence, cache_blocks: bool = True) -> None:
        """Release every block of ``seq``; computed full blocks go to the cache first."""
        if cache_blocks:
            self.cache_computed_blocks(seq, finished=True)
        self.pool.free(seq.block_ids[seq.num_locked_blocks :])
        self._unlock(seq)
        seq.block_ids = []
        seq.num_locked_blocks = 0
        self._chunks.pop(seq, None)

    # -- tiers ------------------------------------------------------------------------

    def _onload(self, seq: Sequence, count_hits: bool) -> None:
        """Extend the device match of ``seq`` with blocks from the tiers."""
        tokens = seq.token_array(seq.num_tokens - 1)
        start = seq.num_computed_tokens
        budget = self.num_available_blocks - 1  # leave a block for the tokens to compute
        if budget <= 0 or len(tokens) - start < self.block_size:
            return
        chains = self._chains(seq, len(tokens))
        # Taking blocks may evict, so offload, device blocks, but not this match: locked.
        new_ids = self.tiers.extend(tokens, chains, start, budget, self._take_blocks, count_hits)
        if not new_ids:
            return
        end = start + len(new_ids) * self.block_size
        result = self.cache.insert(tokens[:end], seq.block_ids + new_ids, seq.salt)
        self.cache.lock(result.node)  # the cache owns the new blocks; hold them by lock
        self._unlock(seq)
        first_new = len(seq.block_ids)
        seq.block_ids = list(result.block_ids)
        seq.num_locked_blocks = len(seq.block_ids)
        seq.cache_node = result.node
        seq.num_computed_tokens = end
        self._name_blocks(seq, first_new, len(seq.block_ids))

    def _offload(self, run: EvictedRun) -> None:
        """``on_evict``: name each chunk of ``run`` by its blocks' parent digest, offload."""
        nb = self.chunk_size // self.block_size
        block_ids = run.head_block_ids + run.block_ids
        parents = [self._parents[block_ids[k]] for k in range(0, len(block_ids), nb)]
        self.tiers.offload(run, parents)

    def _name_blocks(self, seq: Sequence, first: int, end: int) -> None:
        """Record the parent digest of blocks ``first .. end-1`` of ``seq`` (now cached)."""
        if first >= end:
            return
        nb = self.chunk_size // self.block_size
        chains = self._chains(seq, end * self.block_size)
        for j in range(first, end):
            self._parents[seq.block_ids[j]] = chains.parent(j // nb)

    def _write_through(self, seq: Sequence, finished: bool) -> None:
        """Hand the cached chunks of ``seq`` not handed over yet to the tiers (and its
        partial last chunk when ``finished``), to be written through."""
        state = self._seq_chunks(seq)
        num_tokens = seq.num_locked_blocks * self.block_size  # held by the cache
        num_chunks = num_tokens // self.chunk_size
        if num_chunks <= state.persisted and not (finished and num_tokens % self.chunk_size):
            return
        tokens = seq.token_array(num_tokens)
        chains = self._chains(seq, num_tokens)
        self.tiers.on_computed(chains, tokens, seq.block_ids, state.persisted, finished)
        state.persisted = num_chunks

    def _chains(self, seq: Sequence, num_tokens: int) -> ChunkChains:
        """The chunk names of ``seq``, fed at least its first ``num_tokens`` tokens."""
        chains = self._seq_chunks(seq).chains
        if chains.num_tokens < num_tokens:
            chains.extend_to(seq.token_array(num_tokens))
        return chains

    def _seq_chunks(self, seq: Sequence) -> _SeqChunks:
        state = self._chunks.get(seq)
        if state is None:
            chains = ChunkChains(self.fingerprint, seq.salt, self.chunk_size)
            state = self._chunks[seq] = _SeqChunks(chains)
        return state

    # -- blocks -----------------------------------------------------------------------

    def _take_blocks(self, count: int) -> list[int] | None:
        """``count`` blocks from the pool, evicting cached ones if needed; None if too few."""
        if self.pool.num_free < count and self.cache is not None:
            self.cache.evict(count - self.pool.num_free)
        if self.pool.num_free < count:
            return None
        return self.pool.allocate(count)

    def _unlock(self, seq: Sequence) -> None:
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
            seq.cache_node = None
