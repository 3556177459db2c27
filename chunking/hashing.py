"""Chained xxh3 hashes over fixed-size chunks of token ids.

The hash of chunk ``i`` is ``xxh3_64`` of its tokens as little-endian int32 bytes,
seeded by the hash of chunk ``i - 1``; chunk 0 is seeded by a root seed that mixes
the model fingerprint and the tenant salt. So a chunk hash names the whole prefix
that ends with it, and two tenants or two models never produce the same chain.
Only full chunks are hashed; a partial tail has no hash.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from collections.abc import Sequence

import numpy as np
import xxhash

TOKEN_DTYPE = np.dtype("<i4")
"""Token ids are hashed, stored and compared as little-endian int32."""

_xxh3 = xxhash.xxh3_64_intdigest  # module attribute so tests can force collisions
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

TokenIds = Sequence[int] | np.ndarray


def as_token_array(token_ids: TokenIds) -> np.ndarray:
    """Return ``token_ids`` as a contiguous little-endian int32 array (no copy if it is one).

    Raises ``ValueError`` for ids that do not fit in int32 or for a non-1-D input.
    """
    if isinstance(token_ids, np.ndarray) and token_ids.dtype != TOKEN_DTYPE:
        if token_ids.size and not np.issubdtype(token_ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {token_ids.dtype}")
        if token_ids.size and (token_ids.min() < _INT32_MIN or token_ids.max() > _INT32_MAX):
            raise ValueError("token ids must fit in int32")
    try:
        arr = np.ascontiguousarray(token_ids, dtype=TOKEN_DTYPE)
    except OverflowError as exc:
        raise ValueError(f"token ids must fit in int32: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {arr.shape}")
    return arr


def same_tokens(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two int32 token arrays are equal.

    A prefix-cache hit verifies every token, 800 KB per side at 200k tokens; libc's
    ``memcmp`` does that with no temporary array (numpy's comparison allocates one),
    which keeps the lookup's tail latency down. Falls back to numpy where unavailable.
    """
    if len(a) != len(b):
        return False
    usable = _MEMCMP is not None and a.dtype == b.dtype == TOKEN_DTYPE
    if not (usable and a.flags.c_contiguous and b.flags.c_contiguous):
        return bool(np.array_equal(a, b))
    return _MEMCMP(a.ctypes.data, b.ctypes.data, a.nbytes) == 0


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two int32 arrays share (no temporary when all agree)."""
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if same_tokens(a, b):
        return n
    return int(np.argmax(a != b))


def _load_memcmp():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        memcmp = libc.memcmp
    except (OSError, AttributeError, TypeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _load_memcmp()


def root_seed(fingerprint: str, salt: str | None = None) -> int:
    """The 64-bit seed of chunk 0: xxh3_64 over the model fingerprint and the tenant salt.

    Both parts are length-prefixed, so no (fingerprint, salt) pair can be spelled as
    another, and ``salt=None`` differs from ``salt=""``.
    """
    fp = fingerprint.encode()
    parts = [b"prefixcache-root\0", struct.pack("<Q", len(fp)), fp]
    if salt is not None:
        raw = salt.encode()
        parts += [b"\1", struct.pack("<Q", len(raw)), raw]
    return _xxh3(b"".join(parts))


def chunk_hashes(token_ids: TokenIds, chunk_size: int, seed: int) -> list[int]:
    """Chained hashes of the full chunks of ``token_ids``; a partial tail is ignored.

    ``seed`` seeds chunk 0 (a ``root_seed``, or the hash of the chunk before when
    hashing the continuation of a sequence).
    """
    _check_chunk_size(chunk_size)
    arr = as_token_array(token_ids)
    step = chunk_size * TOKEN_DTYPE.itemsize
    end = len(arr) // chunk_size * step
    if not end:
        return []
    data = memoryview(arr).cast("B")  # one buffer, sliced without copies
    hashes = []
    h, xxh3 = seed, _xxh3
    for offset in range(0, end, step):
        h = xxh3(data[offset : offset + step], h)
        hashes.append(h)
    return hashes


class ChunkHasher:
    """Incremental ``chunk_hashes`` for a growing sequence: each chunk is hashed once.

    >>> hasher = ChunkHasher(root_seed("model"), chunk_size=4)
    >>> len(hasher.extend([1, 2, 3])), len(hasher.extend([4, 5]))
    (0, 1)
    """

    __slots__ = ("chunk_size", "_hashes", "_pending", "_fill", "_seed", "_num_tokens")

    def __init__(self, seed: int, chunk_size: int) -> None:
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self._seed = seed  # seeds the next chunk
        self._hashes: list[int] = []
        self._pending = np.empty(chunk_size, dtype=TOKEN_DTYPE)
        self._fill = 0  # tokens of the unfinished chunk held in _pending
        self._num_tokens = 0

    @property
    def hashes(self) -> list[int]:
        """Hashes of every full chunk so far (a copy)."""
        return list(self._hashes)

    @property
    def num_tokens(self) -> int:
        """Tokens fed in so far, including the unfinished chunk."""
        return self._num_tokens

    @property
    def next_seed(self) -> int:
        """The seed the next full chunk will be hashed with."""
        return self._seed

    def extend(self, token_ids: TokenIds) -> list[int]:
        """Append tokens; return the hashes of the chunks they completed."""
        arr = as_token_array(token_ids)
        self._num_tokens += len(arr)
        new: list[int] = []
        used = 0
        if self._fill:
            used = min(self.chunk_size - self._fill, len(arr))
            self._pending[self._fill : self._fill + used] = arr[:used]
            self._fill += used
            if self._fill == self.chunk_size:
                new += self._hash_run(self._pending)
                self._fill = 0
        full_end = used + (len(arr) - used) // self.chunk_size * self.chunk_size
        new += self._hash_run(arr[used:full_end])
        rest = arr[full_end:]
        self._pending[self._fill : self._fill + len(rest)] = rest
        self._fill += len(rest)
        return new

    def _hash_run(self, arr: np.ndarray) -> list[int]:
        new = chunk_hashes(arr, self.chunk_size, self._seed)
        if new:
            self._seed = new[-1]
            self._hashes += new
        return new


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
