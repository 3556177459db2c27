"""RadixCache: random operation sequences against NaiveCache, plus targeted contracts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from naive_cache import NaiveCache

import chunking.hashing
from chunking import chunk_hashes, root_seed
from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.events import CacheEvents
from prefixcache.cache.radix_cache import EvictedRun, RadixCache

BS = 2  # block size used by the targeted tests
CS = 4  # chunk size used by the targeted tests


def _cache(num_blocks: int = 64, **kwargs) -> tuple[RadixCache, BlockPool]:
    pool = BlockPool(num_blocks)
    return RadixCache(pool, block_size=BS, chunk_size=CS, fingerprint="m", **kwargs), pool


def _serve(cache: RadixCache, pool: BlockPool, tokens, salt=None):
    """One request: match, compute the uncached blocks, insert, unlock. Returns the match."""
    hit = cache.match(tokens, salt)
    fresh = pool.allocate(len(tokens) // cache.block_size - len(hit.block_ids))
    cache.insert(tokens, hit.block_ids + fresh, salt)
    cache.unlock(hit.node)
    cache.check_integrity()
    return hit


# -- the radix tree against the obvious implementation ----------------------------------


class RadixAgainstNaive(RuleBasedStateMachine):
    """Drive both caches with the same requests; they must agree on every answer.

    ``content`` records, per cache, which prefix each block's KV was computed for, so
    a returned block that holds some other prefix's KV fails the test.
    """

    block_size, chunk_size, num_blocks = 2, 4, 24
    tokens = st.lists(st.integers(0, 2), max_size=16)
    salts = st.sampled_from([None, "tenant"])

    def __init__(self) -> None:
        super().__init__()
        bs, cs, n = self.block_size, self.chunk_size, self.num_blocks
        self.pools = (BlockPool(n), BlockPool(n))
        radix = RadixCache(self.pools[0], bs, cs, "m", on_evict=self._on_evict)
        self.caches = (radix, NaiveCache(self.pools[1], bs, cs))
        self.content: tuple[dict, dict] = ({}, {})
        self.held: list[tuple] = []  # (radix match, naive match) kept locked

    def _whole(self, tokens: list[int]) -> list[int]:
        return tokens[: len(tokens) // self.block_size * self.block_size]

    def _check_blocks(self, side: int, tokens, salt, block_ids) -> None:
        for i, block in enumerate(block_ids):
            prefix = tuple(tokens[: (i + 1) * self.block_size])
            assert self.content[side][block] == (salt, prefix), "block holds other KV"

    def _on_evict(self, run: EvictedRun) -> None:
        """Each evicted block's prefix, seed and chunk hashes must follow from the run."""
        bs, cs = self.block_size, self.chunk_size
        tokens = tuple(run.token_ids.tolist())
        cut = len(tokens) - len(run.block_ids) * bs  # evicted blocks hold tokens[cut:]
        assert run.start % cs == 0 and 0 <= cut < cs
        salt, prefix = self.content[0][run.block_ids[-1]]
        assert prefix[run.start :] == tokens
        chain = chunk_hashes(prefix, cs, root_seed("m", salt))
        assert run.seed == (chain[run.start // cs - 1] if run.start else root_seed("m", salt))
        assert run.chunk_hashes == chain[(run.start + cut) // cs :]
        heads = [(salt, prefix[: run.start + (i + 1) * bs]) for i in range(cut // bs)]
        assert [self.content[0][block] for block in run.head_block_ids] == heads
        for i, block in enumerate(run.block_ids):
            assert self.content[0][block] == (salt, prefix[: run.start + cut + (i + 1) * bs])
            assert self.pools[0].ref_count(block) == 1  # still allocated during the call

    def _match(self, tokens, salt):
        results = [cache.match(tokens, salt) for cache in self.caches]
        assert results[0].num_tokens == results[1].num_tokens
        for side, result in enumerate(results):
            assert len(result.block_ids) * self.block_size == result.num_tokens
            self._check_blocks(side, tokens, salt, result.block_ids)
        return results

    def _allocate(self, tokens, salt, num_new: int):
        """Fresh blocks for the last ``num_new`` blocks of ``tokens``, evicting if needed."""
        need = num_new - self.pools[0].num_free
        if need > 0:
            assert self.caches[0].evict(need) == self.caches[1].evict(need)
        if self.pools[0].num_free < num_new:
            return None
        fresh = [pool.allocate(num_new) for pool in self.pools]
        first = len(tokens) // self.block_size - num_new
        for side in (0, 1):
            for i, block in enumerate(fresh[side], start=first):
                self.content[side][block] = (salt, tuple(tokens[: (i + 1) * self.block_size]))
        return fresh

    @rule(tokens=tokens, salt=salts)
    def match_and_hold(self, tokens, salt):
        results = self._match(tokens, salt)
        if len(self.held) < 3:
            self.held.append(results)
        else:
            for cache, result in zip(self.caches, results, strict=True):
                cache.unlock(result.node)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 2))
    def release(self, index):
        results = self.held.pop(index % len(self.held))
        for cache, result in zip(self.caches, results, strict=True):
            cache.unlock(result.node)

    @rule(tokens=tokens, salt=salts, keep=st.booleans())
    def serve_request(self, tokens, salt, keep):
        """Match, compute the missing blocks, insert; ``keep`` moves the lock to the result."""
        tokens = self._whole(tokens)
        hits = self._match(tokens, salt)
        fresh = self._allocate(tokens, salt, (len(tokens) - hits[0].num_tokens) // self.block_size)
        inserted = []
        for side, (cache, hit) in enumerate(zip(self.caches, hits, strict=True)):
            if fresh is not None:
                result = cache.insert(tokens, hit.block_ids + fresh[side], salt)
                assert result.num_existing_tokens == hit.num_tokens
                assert result.block_ids == hit.block_ids + fresh[side]
                if keep and len(self.held) < 3:
                    cache.lock(result.node)
                    inserted.append(result)
            cache.unlock(hit.node)
        if inserted:
            self.held.append(tuple(inserted))

    @rule(tokens=tokens, salt=salts)
    def insert_without_lookup(self, tokens, salt):
        """Blocks computed from scratch: those already cached are duplicates to release."""
        tokens = self._whole(tokens)
        fresh = self._allocate(tokens, salt, len(tokens) // self.block_size)
        if fresh is None:
            return
        results = [
            cache.insert(tokens, fresh[side], salt) for side, cache in enumerate(self.caches)
        ]
        assert results[0].num_existing_tokens == results[1].num_existing_tokens
        for side, result in enumerate(results):
            self._check_blocks(side, tokens, salt, result.block_ids)

    @rule(num_blocks=st.integers(0, 8))
    def evict(self, num_blocks):
        assert self.caches[0].evict(num_blocks) == self.caches[1].evict(num_blocks)

    @rule()
    def flush(self):
        assert self.caches[0].flush() == self.caches[1].flush()

    @invariant()
    def caches_agree(self):
        radix, naive = self.caches
        radix.check_integrity()
        assert radix.num_cached_blocks == naive.num_cached_blocks
        assert radix.num_locked_blocks == naive.num_locked_blocks
        assert self.pools[0].num_free == self.pools[1].num_free

    def teardown(self):
        for results in self.held:
            for cache, result in zip(self.caches, results, strict=True):
                cache.unlock(result.node)
        radix = self.caches[0]
        radix.check_integrity()
        radix.reset()
        assert self.pools[0].num_free == self.num_blocks


class RadixAgainstNaiveLongChunks(RadixAgainstNaive):
    """Chunks of four blocks and longer prompts: more splits inside a chunk."""

    block_size, chunk_size, num_blocks = 2, 8, 32
    tokens = st.lists(st.integers(0, 1), max_size=24)


_machine_settings = settings(
    max_examples=120,
    stateful_step_count=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixAgainstNaive = RadixAgainstNaive.TestCase
TestRadixAgainstNaive.settings = _machine_settings
TestRadixAgainstNaiveLongChunks = RadixAgainstNaiveLongChunks.TestCase
TestRadixAgainstNaiveLongChunks.settings = _machine_settings


# -- targeted contracts -----------------------------------------------------------------


def test_turn_two_reuses_turn_one_up_to_its_last_full_block():
    cache, pool = _cache()
    turn_one = list(range(10))  # two full chunks of 4 and one block of a third
    _serve(cache, pool, turn_one)
    turn_two = turn_one + [50, 51, 52]
    assert cache.match(turn_two).num_tokens == 10


def test_a_miss_returns_the_locked_root():
    cache, pool = _cache()
    _serve(cache, pool, [1, 2, 3, 4])
    miss = cache.match([1])  # less than a block
    assert (miss.num_tokens, miss.block_ids) == (0, [])
    assert cache.num_locked_blocks == 0
    cache.unlock(miss.node)
    cache.check_integrity()


def test_divergence_inside_a_chunk_still_reuses_the_blocks_before_it():
    cache, pool = _cache()
    _serve(cache, pool, [1, 2, 3, 4, 5, 6, 7, 8])
    hit = _serve(cache, pool, [1, 2, 3, 4, 5, 6, 9, 9])
    assert hit.num_tokens == 6
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8]).num_tokens == 8
    assert cache.match([1, 2, 3, 4, 5, 6, 9, 9]).num_tokens == 8


def test_locked_path_is_never_evicted():
    cache, pool = _cache(num_blocks=8)
    _serve(cache, pool, list(range(8)))
    _serve(cache, pool, [9] * 8)
    held = cache.match(list(range(8)))
    assert cache.evict(8) == 4  # only the unlocked path goes
    assert cache.num_locked_blocks == 4 and cache.num_evictable_blocks == 0
    assert cache.match(list(range(8))).num_tokens == 8
    cache.check_integrity()
    cache.unlock(held.node)
    cache.unlock(held.node)
    assert cache.evict(8) == 4


def test_different_salt_never_matches():
    cache, pool = _cache()
    _serve(cache, pool, list(range(8)), salt="alice")
    assert cache.match(list(range(8)), "bob").num_tokens == 0
    assert cache.match(list(range(8))).num_tokens == 0
    assert cache.match(list(range(8)), "alice").num_tokens == 8


def test_different_fingerprint_never_matches():
    pool = BlockPool(16)
    model_a = RadixCache(pool, BS, CS, fingerprint="model-a")
    model_b = RadixCache(pool, BS, CS, fingerprint="model-b")
    _serve(model_a, pool, list(range(8)))
    assert model_b.match(list(range(8))).num_tokens == 0
    assert model_a.match(list(range(8))).num_tokens == 8


def test_forced_hash_collision_is_rejected_by_token_verification(monkeypatch):
    monkeypatch.setattr(chunking.hashing, "_xxh3", lambda data, seed=0: 42)
    cache, pool = _cache()
    first, second = [1] * 8, [2] * 8
    assert chunk_hashes(first, CS, 0) == chunk_hashes(second, CS, 0)  # really colliding
    _serve(cache, pool, first)
    assert cache.match(second).num_tokens == 0
    _serve(cache, pool, second)
    one, two = cache.match(first), cache.match(second)
    assert (one.num_tokens, two.num_tokens) == (8, 8)
    assert not set(one.block_ids) & set(two.block_ids)
    assert cache.match([1, 1, 2, 2]).num_tokens == 2
    cache.check_integrity()


def test_duplicate_blocks_on_insert_are_released():
    cache, pool = _cache(num_blocks=10)
    tokens = list(range(8))
    first = cache.insert(tokens, pool.allocate(4))
    again = pool.allocate(4)
    result = cache.insert(tokens + [8, 9], again + pool.allocate(1))
    assert result.num_existing_tokens == 8
    assert result.block_ids[:4] == first.block_ids
    assert all(pool.ref_count(block) == 0 for block in again)
    assert pool.num_free == 10 - 5
    cache.check_integrity()


def test_insert_extends_a_partial_chunk_tail():
    cache, pool = _cache()
    (first,) = cache.insert([1, 2], pool.allocate(1)).block_ids  # half a chunk
    result = cache.insert([1, 2, 3, 4, 5, 6], [first, *pool.allocate(2)])
    assert result.num_existing_tokens == 2 and result.block_ids[0] == first
    hit = cache.match([1, 2, 3, 4, 5, 6, 7, 8])
    assert hit.num_tokens == 6
    fresh = pool.allocate(1)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], hit.block_ids + fresh)  # below a locked node
    cache.unlock(hit.node)
    cache.check_integrity()
    assert cache.match(list(range(1, 9))).block_ids == result.block_ids + fresh


def test_evict_trims_a_long_leaf_one_block_at_a_time():
    runs: list[EvictedRun] = []
    cache, pool = _cache(num_blocks=64, on_evict=runs.append)
    tokens = list(range(100, 140))  # one node of 20 blocks
    cache.insert(tokens, pool.allocate(20))
    assert cache.evict(1) == 1
    assert cache.num_cached_blocks == 19
    hit = cache.match(tokens)
    assert hit.num_tokens == 38
    cache.unlock(hit.node)
    assert [len(run.block_ids) for run in runs] == [1]
    assert cache.stats.evicted_blocks == 1
    cache.check_integrity()


def test_on_evict_gets_chunk_aligned_tokens_seed_and_hashes():
    runs: list[EvictedRun] = []
    cache, pool = _cache(on_evict=runs.append)
    tokens = list(range(10, 20))
    stored = cache.insert(tokens, pool.allocate(5))
    cache.evict(3)  # the blocks for tokens 14..19
    (run,) = runs
    hashes = chunk_hashes(tokens, CS, root_seed("m"))
    assert run.start == 4 and run.seed == hashes[0]
    assert run.token_ids.tolist() == tokens[4:]
    assert run.block_ids == stored.block_ids[2:]
    assert run.chunk_hashes == hashes[1:]
    assert all(pool.ref_count(block) == 0 for block in run.block_ids)


def _check_run(run: EvictedRun, content: dict[int, tuple], salt=None) -> None:
    """``run`` against the prefix each block was computed for (``content``)."""
    tokens = tuple(run.token_ids.tolist())
    cut = len(tokens) - len(run.block_ids) * BS  # the evicted blocks hold tokens[cut:]
    prefix = content[run.block_ids[-1]]
    assert run.start % CS == 0 and prefix[run.start :] == tokens
    chain = chunk_hashes(prefix, CS, root_seed("m", salt))
    assert run.seed == (chain[run.start // CS - 1] if run.start else root_seed("m", salt))
    assert run.chunk_hashes == chain[(run.start + cut) // CS :]
    heads = [prefix[: run.start + (i + 1) * BS] for i in range(cut // BS)]
    assert [content[b] for b in run.head_block_ids] == heads


@pytest.mark.parametrize(
    ("split", "end"),
    [(6, 10), (8, 10), (2, 6), (4, 12)],
    ids=["chunk-starts-inside-a-later-node", "node-starts-on-the-chunk", "short", "long"],
)
def test_runs_evicted_block_by_block_name_their_chunk_across_nodes(split, end):
    """Leaves below a node that starts at ``split``: their chunk may begin inside that
    node, or exactly where it starts; every run's seed, head blocks and hashes hold."""
    runs: list[EvictedRun] = []
    cache, pool = _cache(on_evict=runs.append)
    content: dict[int, tuple] = {}

    def serve(tokens):
        hit = cache.match(tokens)
        fresh = pool.allocate(len(tokens) // BS - len(hit.block_ids))
        for i, block in enumerate(fresh, start=len(hit.block_ids)):
            content[block] = tuple(tokens[: (i + 1) * BS])
        cache.insert(tokens, hit.block_ids + fresh)
        cache.unlock(hit.node)

    base = list(range(1, end + 1))
    serve(base)
    serve(base[:split] + [90, 91])  # splits the node at ``split``
    serve(base + [70, 71])
    serve(base + [80, 81])  # two leaves below the node [split, end)
    while cache.num_cached_blocks:
        cache.evict(1)
    assert sum(len(run.block_ids) for run in runs) == len(content)
    for run in runs:
        _check_run(run, content)
    cache.check_integrity()


def test_a_tenant_flush_counts_what_it_frees_and_offloads_nothing():
    runs: list[EvictedRun] = []
    cache, pool = _cache(on_evict=runs.append)
    for salt in ("a:1", "a:2", "b:1"):
        _serve(cache, pool, [1, 2, 3, 4, 5, 6], salt)
        _serve(cache, pool, [1, 2, 7, 8], salt)  # a branch: three nodes per tree
    assert cache.flush("a") == 8
    assert runs == [] and cache.num_cached_blocks == 4
    assert cache.flush() == 4 and runs == []
    cache.check_integrity()


def test_reset_forgets_the_counters_too():
    cache, pool = _cache()
    _serve(cache, pool, [1, 2, 3, 4])
    _serve(cache, pool, [1, 2, 3, 4, 5, 6])
    assert cache.stats.hit_tokens == 4
    cache.reset()
    assert cache.stats.query_tokens == cache.stats.hit_tokens == 0
    assert cache.stats.evicted_blocks == 0


def test_lru_order_evicts_the_least_recently_used_leaf_first():
    cache, pool = _cache()
    old, middle, new = [1] * 4, [2] * 4, [3] * 4
    for tokens in (old, middle, new):
        _serve(cache, pool, tokens)
    _serve(cache, pool, old)  # used again: now the most recent
    cache.evict(2)
    assert [cache.match(t).num_tokens for t in (old, middle, new)] == [4, 0, 4]


def test_a_prefix_outlives_its_suffix():
    cache, pool = _cache()
    _serve(cache, pool, [1] * 8)
    _serve(cache, pool, [1] * 4)  # the shared prefix is the most recent ...
    cache.evict(2)  # ... but its suffix, a leaf, must go first
    assert cache.match([1] * 8).num_tokens == 4


def test_match_splits_so_only_the_matched_part_is_locked():
    cache, pool = _cache()
    cache.insert(list(range(20)), pool.allocate(10))
    hit = cache.match(list(range(4)) + [99, 99])
    assert hit.num_tokens == 4 and cache.num_locked_blocks == 2
    assert cache.evict(10) == 8
    cache.unlock(hit.node)
    cache.check_integrity()


def test_flush_drops_unlocked_entries_and_reset_drops_everything():
    cache, pool = _cache(num_blocks=16)
    _serve(cache, pool, [1] * 8)
    _serve(cache, pool, [2] * 8)
    held = cache.match([1] * 8)
    assert cache.flush() == 4
    cache.check_integrity()
    miss = cache.match([2] * 8)
    assert miss.num_tokens == 0
    cache.unlock(miss.node)
    with pytest.raises(RuntimeError, match=r"^reset\(\) while nodes are locked$"):
        cache.reset()
    cache.unlock(held.node)
    cache.reset()
    assert pool.num_free == 16 and cache.num_cached_blocks == 0
    cache.check_integrity()
    with pytest.raises(ValueError, match="no longer in the cache"):
        cache.lock(held.node)


def test_unlock_of_an_unlocked_node_raises():
    cache, pool = _cache()
    result = cache.insert([1, 2], pool.allocate(1))
    with pytest.raises(ValueError, match=r"^unlock of a node that is not locked$"):
        cache.unlock(result.node)


def test_an_evicted_node_cannot_be_locked():
    cache, pool = _cache()
    result = cache.insert([1, 2], pool.allocate(1))
    cache.evict(1)
    message = r"^node is no longer in the cache \(evicted, flushed or reset\)$"
    with pytest.raises(ValueError, match=message):
        cache.lock(result.node)


def test_bad_inserts_raise_and_change_nothing():
    cache, pool = _cache(num_blocks=4)
    with pytest.raises(ValueError, match="3 tokens for 1 blocks"):
        cache.insert([1, 2, 3], pool.allocate(1))
    with pytest.raises(ValueError, match="free in the pool"):
        cache.insert([1, 2], [3])
    (block,) = pool.allocate(1)
    with pytest.raises(ValueError, match=r"^insert got the same block id twice$"):
        cache.insert([1, 2, 3, 4], [block, block])
    assert cache.num_cached_blocks == 0
    cache.check_integrity(num_held_outside=2)


def test_chunk_size_must_be_a_multiple_of_block_size():
    with pytest.raises(ValueError, match="multiple of block_size"):
        RadixCache(BlockPool(4), block_size=4, chunk_size=6)


def test_defaults_are_the_engines_block_and_chunk_sizes():
    cache = RadixCache(BlockPool(4))
    assert (cache.block_size, cache.chunk_size, cache.fingerprint) == (16, 256, "")


@pytest.mark.parametrize(
    ("block_size", "chunk_size", "message"),
    [
        (0, 4, "block_size must be a positive integer, got 0"),
        (-2, 4, "block_size must be a positive integer"),
        ("2", 4, "block_size must be a positive integer"),
        (2, 0, "positive multiple of block_size"),
        (2, -4, "positive multiple of block_size"),
        (2, 4.0, "positive multiple of block_size"),
    ],
)
def test_bad_sizes_are_refused(block_size, chunk_size, message):
    with pytest.raises(ValueError, match=message):
        RadixCache(BlockPool(4), block_size=block_size, chunk_size=chunk_size)


def test_the_smallest_sizes_are_accepted():
    cache = RadixCache(BlockPool(4), block_size=1, chunk_size=1)
    assert cache.insert([5, 6], cache.pool.allocate(2)).num_existing_tokens == 0
    cache.check_integrity()


def test_evicted_blocks_add_up_over_evictions():
    cache, pool = _cache()
    _serve(cache, pool, list(range(8)))
    cache.evict(1)
    cache.evict(2)
    assert cache.stats.evicted_blocks == 3


def test_a_salt_whose_entries_are_all_evicted_leaves_no_tree_behind():
    cache, pool = _cache()
    _serve(cache, pool, [1, 2, 3, 4], "t")
    cache.evict(2)
    assert "t" not in cache._roots  # one empty root per salt ever seen would add up
    cache.check_integrity()


def test_stats_count_query_hit_and_evicted():
    cache, pool = _cache()
    _serve(cache, pool, list(range(8)))
    _serve(cache, pool, list(range(6)) + [0, 0])
    cache.evict(1)
    assert (cache.stats.query_tokens, cache.stats.hit_tokens) == (16, 6)
    assert cache.stats.evicted_blocks == 1
    assert cache.stats.hit_rate == pytest.approx(6 / 16)


def test_integrity_check_catches_a_leaked_block():
    cache, pool = _cache()
    cache.insert([1, 2], pool.allocate(1))
    pool.allocate(1)  # held by no one the check knows about
    with pytest.raises(AssertionError, match="outside 0"):
        cache.check_integrity()
    cache.check_integrity(num_held_outside=1)


def test_numpy_and_list_queries_agree():
    cache, pool = _cache()
    tokens = np.arange(30, dtype=np.int64)
    cache.insert(tokens, pool.allocate(15))
    assert cache.match(tokens.tolist()).num_tokens == cache.match(tokens).num_tokens == 30


def test_peek_reports_the_match_length_and_changes_nothing():
    pool = BlockPool(16)
    cache = RadixCache(pool, block_size=2, chunk_size=4, fingerprint="m")
    blocks = pool.allocate(4)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], blocks)
    before = (cache.stats.query_tokens, cache.num_locked_blocks, cache.num_evictable_blocks)
    assert cache.peek([1, 2, 3, 4, 5, 9, 9]) == 4
    assert cache.peek([1, 2, 3, 4, 5, 9, 9], salt="other") == 0
    assert (cache.stats.query_tokens, cache.num_locked_blocks, cache.num_evictable_blocks) == before
    result = cache.match([1, 2, 3, 4, 5, 9, 9])
    assert result.num_tokens == 4
    cache.unlock(result.node)
    cache.check_integrity()


def test_a_node_split_past_the_first_chunk_keeps_only_its_own_chunk_hashes():
    """A node that starts at a chunk boundary after the first, split inside its first
    chunk: the head holds no full chunk, so every hash stays with the tail, and the
    tail's eviction names its chunks by them."""
    runs: list[EvictedRun] = []
    cache, pool = _cache(on_evict=runs.append)
    base = list(range(1, 13))  # three chunks of 4
    _serve(cache, pool, base[:4])
    _serve(cache, pool, base)  # below the locked first chunk: a node for tokens 4..12
    _serve(cache, pool, base[:6] + [90, 91])  # splits that node after one block
    cache.check_integrity()
    hit = cache.match(base[:6] + [90, 91])  # keep the head and the new branch cached
    assert cache.evict(3) == 3  # the tail, tokens 6..12: all that is unlocked
    cache.unlock(hit.node)
    chain = chunk_hashes(base, CS, root_seed("m"))
    (run,) = runs
    assert (run.start, run.seed, run.chunk_hashes) == (4, chain[0], chain[1:])
    assert run.token_ids.tolist() == base[4:]
    cache.check_integrity()


def test_hit_tokens_add_up_over_matches():
    cache, pool = _cache()
    _serve(cache, pool, list(range(8)))
    _serve(cache, pool, list(range(4)) + [0, 0])  # 4 hit tokens
    _serve(cache, pool, list(range(6)) + [0, 0])  # 6 more
    assert (cache.stats.query_tokens, cache.stats.hit_tokens) == (22, 10)


def test_a_salt_that_was_only_looked_up_leaves_no_tree_and_its_root_is_gone():
    """A miss creates the salt's root to lock it; the last unlock drops it again (one
    root per salt ever asked for would add up), and the dropped root cannot be locked."""
    cache, pool = _cache()
    _serve(cache, pool, [1, 2, 3, 4], "kept")
    miss = cache.match([1, 2, 3, 4], "asked-once")
    assert miss.num_tokens == 0
    cache.unlock(miss.node)
    assert set(cache._roots) == {"kept"}
    with pytest.raises(ValueError, match="no longer in the cache"):
        cache.lock(miss.node)
    cache.check_integrity()


@pytest.mark.parametrize("listening", [True, False])
def test_an_evicted_run_names_its_tenant_salt_only_while_events_are_recorded(listening):
    events = CacheEvents()
    if listening:
        events.subscribe(lambda batch: None)
    runs: list[EvictedRun] = []
    cache, pool = _cache(on_evict=runs.append, events=events)
    _serve(cache, pool, [1, 2, 3, 4, 5, 6], "tenant:1")
    cache.evict(1)
    assert [run.salt for run in runs] == ["tenant:1" if listening else None]


def _listening() -> tuple[CacheEvents, list]:
    events, batches = CacheEvents(), []
    events.subscribe(batches.append)
    return events, batches


def _published(events: CacheEvents, batches: list) -> list[tuple[str, str | None, tuple]]:
    """The events published since the last call."""
    events.publish()
    published = [(e.kind, e.salt, e.chunk_hashes) for batch in batches for e in batch]
    batches.clear()
    return published


def test_events_name_stored_and_evicted_chunks_with_their_salt_suffix_first():
    events, batches = _listening()
    cache, pool = _cache(events=events)
    tokens = list(range(1, 11))  # two full chunks and a block
    _serve(cache, pool, tokens, "t:1")
    chain = tuple(chunk_hashes(tokens, CS, root_seed("m", "t:1")))
    assert _published(events, batches) == [("stored", "t:1", chain)]
    assert events.on_device == set(chain)
    cache.evict(5)
    assert _published(events, batches) == [("evicted", "t:1", chain[::-1])]
    assert events.on_device == set()


def test_chunks_evicted_to_on_evict_are_left_to_it_to_report():
    events, batches = _listening()
    runs: list[EvictedRun] = []
    cache, pool = _cache(on_evict=runs.append, events=events)
    _serve(cache, pool, list(range(1, 9)))
    _published(events, batches)
    cache.evict(4)
    assert _published(events, batches) == [] and len(runs) == 1
    assert events.on_device == set()


def test_the_lru_heap_drops_stale_entries_and_keeps_every_evictable_leaf():
    """Each use of a leaf pushes a new heap entry; past twice the node count plus 64 the
    stale ones are dropped, and every leaf that can be evicted keeps its live entry."""
    cache, pool = _cache()
    leaves = [[i] * 4 for i in range(1, 4)]
    for _ in range(40):  # 120 uses of three leaves: the heap is compacted
        for tokens in leaves:
            _serve(cache, pool, tokens)
    assert len(cache._heap) < 2 * 3 + 64 + 1
    _serve(cache, pool, leaves[0])  # the most recent: evicted last
    assert cache.evict(4) == 4
    assert [cache.peek(tokens) for tokens in leaves] == [4, 0, 0]
    cache.check_integrity()
