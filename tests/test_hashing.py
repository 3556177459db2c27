"""Chained chunk hashes: reference values, chaining, salting, incremental hashing."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from chunking import ChunkHasher, as_token_array, chunk_hashes, root_seed


def _reference_hashes(tokens: list[int], chunk_size: int, seed: int) -> list[int]:
    hashes = []
    for start in range(0, len(tokens) - chunk_size + 1, chunk_size):
        data = np.array(tokens[start : start + chunk_size], dtype="<i4").tobytes()
        seed = xxhash.xxh3_64_intdigest(data, seed=seed)
        hashes.append(seed)
    return hashes


def test_chunk_hashes_match_xxh3_of_int32_bytes_chained_by_seed():
    tokens = list(range(1000, 1010))
    assert chunk_hashes(tokens, 4, 7) == _reference_hashes(tokens, 4, 7)
    assert len(chunk_hashes(tokens, 4, 7)) == 2  # the partial tail has no hash


def test_chunk_hashes_of_fewer_tokens_than_a_chunk_is_empty():
    assert chunk_hashes([1, 2, 3], 4, 0) == []
    assert chunk_hashes([], 4, 0) == []


def test_list_int32_and_int64_inputs_hash_alike():
    tokens = [5, 900_000, 3, 2**31 - 1, 0, 1, 2, 3]
    expected = chunk_hashes(tokens, 4, 1)
    assert chunk_hashes(np.array(tokens, dtype=np.int32), 4, 1) == expected
    assert chunk_hashes(np.array(tokens, dtype=np.int64), 4, 1) == expected


def test_a_changed_token_changes_its_chunk_and_every_later_one():
    tokens = list(range(12))
    changed = tokens.copy()
    changed[5] = 99
    before, after = chunk_hashes(tokens, 4, 0), chunk_hashes(changed, 4, 0)
    assert before[0] == after[0]
    assert before[1] != after[1] and before[2] != after[2]


def test_root_seed_separates_fingerprints_and_salts():
    seeds = {
        root_seed("model-a"),
        root_seed("model-b"),
        root_seed("model-a", ""),
        root_seed("model-a", "tenant"),
        root_seed("model-atenant"),
        root_seed("ab", "c"),
        root_seed("a", "bc"),
    }
    assert len(seeds) == 7
    assert root_seed("model-a", "tenant") == root_seed("model-a", "tenant")
    assert all(0 <= seed < 2**64 for seed in seeds)


def test_same_tokens_under_different_seeds_hash_differently():
    tokens = list(range(8))
    assert chunk_hashes(tokens, 4, root_seed("m", "x")) != chunk_hashes(
        tokens, 4, root_seed("m", "y")
    )


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 50), max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    chunk_size=st.sampled_from([1, 3, 4, 8]),
)
def test_chunk_hasher_gives_the_same_hashes_however_the_sequence_is_fed(tokens, cuts, chunk_size):
    hasher = ChunkHasher(123, chunk_size)
    got = []
    bounds = [0, *sorted(c for c in cuts if c <= len(tokens)), len(tokens)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        got += hasher.extend(tokens[lo:hi])
    expected = chunk_hashes(tokens, chunk_size, 123)
    assert got == expected == hasher.hashes
    assert hasher.num_tokens == len(tokens)
    assert hasher.next_seed == (expected[-1] if expected else 123)


def test_as_token_array_rejects_ids_outside_int32_and_nested_input():
    with pytest.raises(ValueError, match="int32"):
        as_token_array([2**31])
    with pytest.raises(ValueError, match="int32"):
        as_token_array(np.array([-(2**40)], dtype=np.int64))
    with pytest.raises(ValueError, match="one-dimensional"):
        as_token_array([[1, 2]])


def test_as_token_array_does_not_copy_an_int32_array():
    tokens = np.arange(10, dtype=np.int32)
    assert as_token_array(tokens) is tokens


@pytest.mark.parametrize("bad", [0, -4, 2.0])
def test_chunk_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_hashes([1, 2], bad, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkHasher(0, bad)
