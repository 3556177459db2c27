"""Chunk names keep tenants and models apart: reference values for the root seed and
digest, and chains that depend on the salt, the model and every chunk before.

These close gaps a mutation run found in ``chunking/hashing.py`` and
``prefixcache/tiers/chunk_chains.py`` (see ``docs/mutation.md``): each test here fails
on one of the mutants that survived the earlier tests.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import xxhash

from chunking import ChunkHasher, chunk_hashes, root_seed
from chunking.hashing import same_tokens
from prefixcache.tiers.chunk_chains import ChunkChains, root_digest

FINGERPRINT, SALT = "model-a", "tenant-1"


def _framed(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_root_seed_is_xxh3_of_the_framed_fingerprint_and_salt():
    plain = b"prefixcache-root\0" + _framed(FINGERPRINT)
    assert root_seed(FINGERPRINT) == xxhash.xxh3_64_intdigest(plain)
    salted = plain + b"\1" + _framed(SALT)
    assert root_seed(FINGERPRINT, SALT) == xxhash.xxh3_64_intdigest(salted)


def test_root_digest_is_blake2b_of_the_framed_fingerprint_and_salt():
    head = b"prefixcache-prefix\0" + _framed(FINGERPRINT)
    plain = hashlib.blake2b(head, digest_size=16).digest()
    salted = hashlib.blake2b(head + b"\1" + _framed(SALT), digest_size=16).digest()
    assert root_digest(FINGERPRINT, None) == plain
    assert root_digest(FINGERPRINT, SALT) == salted


def test_two_models_under_one_salt_never_share_a_root():
    assert root_seed("model-a", SALT) != root_seed("model-b", SALT)
    assert root_digest("model-a", SALT) != root_digest("model-b", SALT)


def _chains(fingerprint: str, salt: str | None, tokens: np.ndarray) -> ChunkChains:
    chains = ChunkChains(fingerprint, salt, 4)
    chains.extend_to(tokens)
    return chains


def _names(chains: ChunkChains) -> list:
    return [(chains.chunk_hash(c), chains.parent(c)) for c in range(chains.num_chunks + 1)]


def test_the_salt_and_the_model_change_every_chunk_name():
    tokens = np.arange(12, dtype=np.int32)
    base = _names(_chains(FINGERPRINT, SALT, tokens))
    for other in (_chains(FINGERPRINT, "tenant-2", tokens), _chains("model-b", SALT, tokens)):
        for mine, theirs in zip(base, _names(other), strict=True):
            assert mine[1] != theirs[1]  # parent digests
            assert mine[0] is None or mine[0] != theirs[0]  # chained hashes


def test_a_chunk_digest_names_every_chunk_before_it():
    first = np.array([1, 2, 3, 4, 9, 9, 9, 9, 5, 5, 5, 5], dtype=np.int32)
    second = first.copy()
    second[0] = 7  # only chunk 0 differs
    a, b = _chains(FINGERPRINT, SALT, first), _chains(FINGERPRINT, SALT, second)
    assert a.parent(2) != b.parent(2) and a.parent(3) != b.parent(3)
    assert a.chunk_hash(2) != b.chunk_hash(2)


def test_chains_fed_in_pieces_name_chunks_as_fed_at_once():
    tokens = np.arange(100, 120, dtype=np.int32)
    whole = _chains(FINGERPRINT, SALT, tokens)
    pieces = ChunkChains(FINGERPRINT, SALT, 4)
    for end in (2, 7, 9, 20):
        pieces.extend_to(tokens[:end])
    assert _names(pieces) == _names(whole)
    assert pieces.chunk_hash(whole.num_chunks) is None  # past the last chunk: no name


@pytest.mark.parametrize("cuts", [(2, 7, 9), (1, 5, 6, 13), (3, 4, 8, 12, 16)])
def test_chunk_hasher_fed_in_uneven_pieces_matches_one_pass(cuts):
    tokens = list(range(50, 70))
    hasher = ChunkHasher(99, 4)
    got = []
    for lo, hi in zip((0, *cuts), (*cuts, len(tokens)), strict=True):
        got += hasher.extend(tokens[lo:hi])
    assert got == chunk_hashes(tokens, 4, 99) == hasher.hashes


def test_same_tokens_compares_length_and_every_dtype_path():
    a = np.arange(10, dtype=np.int32)
    assert not same_tokens(a, a[:9]) and not same_tokens(a[:9], a)
    assert same_tokens(a, a.copy())
    assert same_tokens(a.astype(np.int64), np.arange(10, dtype=np.int64))  # numpy path
    strided = np.arange(20, dtype=np.int32)[::2]  # not contiguous: numpy path
    assert same_tokens(strided, np.arange(0, 20, 2, dtype=np.int32))
    assert not same_tokens(strided, np.arange(1, 21, 2, dtype=np.int32))
