"""A sequence's two chains of chunk names, each built once per chunk as it grows.

- The 64-bit xxh3 chain of ``chunking.hashing`` (the radix tree's ``hashes``): compact
  keys for indexes and file names.
- A 128-bit BLAKE2b chain over the same chunks: ``digest(c)`` names the whole prefix
  through chunk ``c``. The host and disk tiers store the digest of the prefix *before*
  a chunk beside the chunk's token ids and verify both on lookup, so serving KV after
  the wrong prefix needs a BLAKE2b collision, not just two colliding 64-bit chains.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from chunking.hashing import TOKEN_DTYPE, ChunkHasher, root_seed

DIGEST_SIZE = 16


def root_digest(fingerprint: str, salt: str | None) -> bytes:
    """The digest chunk 0 is chained to: the model fingerprint and the tenant salt."""
    digest = hashlib.blake2b(b"prefixcache-prefix\0", digest_size=DIGEST_SIZE)
    raw = fingerprint.encode()
    digest.update(struct.pack("<Q", len(raw)) + raw)
    if salt is not None:
        raw = salt.encode()
        digest.update(b"\1" + struct.pack("<Q", len(raw)) + raw)
    return digest.digest()


def chunk_digest(parent: bytes, tokens: np.ndarray) -> bytes:
    """The digest of a prefix: ``parent`` (the prefix before) then ``tokens`` (one chunk)."""
    return hashlib.blake2b(tokens.tobytes(), digest_size=DIGEST_SIZE, key=parent).digest()


class ChunkChains:
    """Both chains over the full chunks of one growing token sequence."""

    __slots__ = ("chunk_size", "root_seed", "root_digest", "_hasher", "_hashes", "_digests")

    def __init__(self, fingerprint: str, salt: str | None, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.root_seed = root_seed(fingerprint, salt)
        self.root_digest = root_digest(fingerprint, salt)
        self._hasher = ChunkHasher(self.root_seed, chunk_size)
        self._hashes: list[int] = []
        self._digests: list[bytes] = []

    @property
    def num_tokens(self) -> int:
        """Tokens fed in so far."""
        return self._hasher.num_tokens

    def extend_to(self, tokens: np.ndarray) -> None:
        """Feed ``tokens`` (the sequence's first ``n`` tokens) past what was fed before."""
        start = self._hasher.num_tokens
        if len(tokens) <= start:
            return
        self._hashes += self._hasher.extend(tokens[start:])
        cs = self.chunk_size
        arr = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        for c in range(len(self._digests), len(tokens) // cs):
            self._digests.append(chunk_digest(self.parent(c), arr[c * cs : (c + 1) * cs]))

    @property
    def num_chunks(self) -> int:
        """Full chunks fed so far."""
        return len(self._hashes)

    def chunk_hash(self, chunk: int) -> int | None:
        """The 64-bit chained hash of ``chunk``, or None if it is not full (or not fed)."""
        return self._hashes[chunk] if chunk < len(self._hashes) else None

    def seed(self, chunk: int) -> int:
        """The 64-bit seed of ``chunk``: the hash of the chunk before it."""
        return self._hashes[chunk - 1] if chunk else self.root_seed

    def parent(self, chunk: int) -> bytes:
        """The digest of the prefix before ``chunk``."""
        return self._digests[chunk - 1] if chunk else self.root_digest
