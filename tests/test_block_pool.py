"""BlockPool: allocation, reference counts, and errors that change nothing."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixcache.cache.block_pool import BlockPool, NoFreeBlocksError


def test_fresh_pool_hands_out_distinct_blocks_with_one_reference():
    pool = BlockPool(8)
    ids = pool.allocate(3) + pool.allocate(5)
    assert sorted(ids) == list(range(8))
    assert pool.num_free == 0 and pool.num_blocks == 8
    assert all(pool.ref_count(b) == 1 for b in ids)
    assert pool.allocate(0) == []


def test_allocating_more_than_free_raises_and_allocates_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError, match="asked for 2 .* only 1 are free") as info:
        pool.allocate(2)
    assert isinstance(info.value, ValueError)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert pool.num_free == 1


def test_block_returns_to_free_list_only_when_last_reference_drops():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.incref([block])
    pool.free([block])
    assert pool.ref_count(block) == 1 and pool.num_free == 1
    pool.free([block])
    assert pool.ref_count(block) == 0 and pool.num_free == 2


def test_freeing_a_free_block_raises_and_rolls_back_the_whole_call():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError, match="already free"):
        pool.free([a, b, b])
    assert pool.ref_count(a) == 1 and pool.ref_count(b) == 1 and pool.num_free == 2
    with pytest.raises(ValueError, match="already free"):
        pool.free([a, 3])
    assert pool.ref_count(a) == 1 and pool.num_free == 2


def test_incref_of_a_free_block_raises_and_changes_nothing():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    with pytest.raises(ValueError, match="is free"):
        pool.incref([a, 2])
    assert pool.ref_count(a) == 1


@pytest.mark.parametrize("bad", [-1, 3, 1.0])
def test_ids_outside_the_pool_are_rejected(bad):
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="not in the pool"):
        pool.ref_count(bad)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(-1)
    with pytest.raises(ValueError, match="allocate"):
        BlockPool(2).allocate(-1)


_ops = st.lists(
    st.tuples(st.sampled_from(["allocate", "incref", "free"]), st.integers(0, 5)), max_size=60
)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(ops=_ops)
def test_counts_follow_a_reference_model(ops):
    pool = BlockPool(6)
    model: Counter[int] = Counter()
    for op, arg in ops:
        held = sorted(b for b, n in model.items() if n)
        if op == "allocate":
            if arg > pool.num_free:
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate(arg)
                continue
            model.update(pool.allocate(arg))
        elif held:
            block = held[arg % len(held)]
            getattr(pool, op)([block])
            model[block] += 1 if op == "incref" else -1
        assert pool.num_free == sum(1 for b in range(6) if model[b] == 0)
        assert all(pool.ref_count(b) == model[b] for b in range(6))


def test_freed_blocks_come_back_out_in_ascending_order():
    pool = BlockPool(16)
    first, second = pool.allocate(6), pool.allocate(6)
    pool.free(reversed(first))
    pool.free(second[::2])
    again = pool.allocate(3)
    assert again == sorted(again) and again == [again[0] + 2 * k for k in range(3)]
    rest = pool.allocate(6)
    assert rest == first  # a whole freed sequence is handed out as one run again
