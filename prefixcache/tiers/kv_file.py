"""The file format of one hash chunk of KV on disk, and its verification.

Layout: a 16-byte prefix (magic, format version, header length); a JSON header (model
fingerprint, chunk hash, digest of the prefix before the chunk, start position, dtype,
shape, payload size, and an xxh3 checksum of tokens and payload); the chunk's token ids
as little-endian int32; then the KV payload ``[layers, 2, blocks_per_chunk, block_size,
kv_heads, head_dim]`` in the header's dtype. ``decode`` checks every part against what
the reader expects, so a file that is truncated, corrupt or written by another model
or layout raises ``ChunkFileError``."""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from chunking.hashing import TOKEN_DTYPE

MAGIC = b"PCKVCHNK"
VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_MAX_HEADER = 1 << 16


class ChunkFileError(ValueError):
    """A chunk file that cannot be trusted: wrong magic, version, model, shape or bytes."""


class ChunkLayout(NamedTuple):
    """What every chunk file of one engine agrees on."""

    fingerprint: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # (layers, 2, blocks_per_chunk, block_size, kv_heads, head_dim)

    @property
    def chunk_size(self) -> int:
        """Tokens per chunk."""
        return self.shape[2] * self.shape[3]

    @property
    def payload_bytes(self) -> int:
        """Bytes of one chunk's KV."""
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def file_bytes(self) -> int:
        """Bytes of a file without its JSON header."""
        return _PREFIX.size + self.chunk_size * TOKEN_DTYPE.itemsize + self.payload_bytes


class ChunkRecord(NamedTuple):
    """One chunk as stored: its names, tokens and KV (``ChunkLayout.shape``, on CPU)."""

    chunk_hash: int
    parent: bytes  # digest of the prefix before the chunk (see ``chunk_chains``)
    start: int
    tokens: np.ndarray
    data: torch.Tensor


def encode(layout: ChunkLayout, record: ChunkRecord) -> list[bytes | memoryview]:
    """The pieces of a chunk file, in order (write them one after another)."""
    data = record.data.contiguous()
    if tuple(data.shape) != layout.shape or data.dtype != layout.dtype:
        raise ValueError(f"chunk data is {tuple(data.shape)} {data.dtype}, layout wants {layout}")
    payload = memoryview(data.reshape(-1).view(torch.uint8).numpy())
    tokens = np.ascontiguousarray(record.tokens, dtype=TOKEN_DTYPE)
    if len(tokens) != layout.chunk_size:
        raise ValueError(f"a chunk has {layout.chunk_size} tokens, got {len(tokens)}")
    header = json.dumps(
        {
            "fingerprint": layout.fingerprint,
            "hash": f"{record.chunk_hash:016x}",
            "parent": record.parent.hex(),
            "start": record.start,
            "dtype": _dtype_name(layout.dtype),
            "shape": list(layout.shape),
            "payload_bytes": len(payload),
            "xxh3": _checksum(memoryview(tokens), payload),
        },
        sort_keys=True,
    ).encode()
    return [_PREFIX.pack(MAGIC, VERSION, len(header)), header, tokens.tobytes(), payload]


def decode(layout: ChunkLayout, raw: bytearray) -> ChunkRecord:
    """Parse and verify a whole chunk file; raises ``ChunkFileError`` on any mismatch."""
    if len(raw) < _PREFIX.size:
        raise ChunkFileError(f"truncated: {len(raw)} bytes")
    magic, version, header_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise ChunkFileError("not a chunk file (bad magic)")
    if version != VERSION:
        raise ChunkFileError(f"format version {version}, expected {VERSION}")
    if header_len > _MAX_HEADER or len(raw) != layout.file_bytes + header_len:
        raise ChunkFileError(f"truncated or oversized: {len(raw)} bytes")
    header = _header(raw[_PREFIX.size : _PREFIX.size + header_len])
    _check_header(layout, header)
    offset = _PREFIX.size + header_len
    view = memoryview(raw)
    tokens_end = offset + layout.chunk_size * TOKEN_DTYPE.itemsize
    if _checksum(view[offset:tokens_end], view[tokens_end:]) != header["xxh3"]:
        raise ChunkFileError("checksum mismatch")
    tokens = np.frombuffer(raw, TOKEN_DTYPE, layout.chunk_size, offset).copy()
    offset, payload = tokens_end, view[tokens_end:]
    flat = torch.frombuffer(raw, dtype=torch.uint8, offset=offset, count=len(payload))
    data = flat.view(layout.dtype).view(layout.shape)
    parent = bytes.fromhex(header["parent"])
    return ChunkRecord(int(header["hash"], 16), parent, header["start"], tokens, data)


def _header(raw: bytes) -> dict:
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChunkFileError(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise ChunkFileError("header is not an object")
    return header


def _check_header(layout: ChunkLayout, header: dict) -> None:
    expected = {
        "fingerprint": layout.fingerprint,
        "dtype": _dtype_name(layout.dtype),
        "shape": list(layout.shape),
        "payload_bytes": layout.payload_bytes,
    }
    for key, value in expected.items():
        if header.get(key) != value:
            raise ChunkFileError(f"{key} is {header.get(key)!r}, expected {value!r}")
    try:
        int(header["hash"], 16), bytes.fromhex(header["parent"]), str(header["xxh3"])
        if not isinstance(header["start"], int) or header["start"] < 0:
            raise ValueError("bad start")
    except (KeyError, TypeError, ValueError) as exc:
        raise ChunkFileError(f"bad header field: {exc}") from None


def _checksum(tokens: memoryview, payload: memoryview) -> str:
    digest = xxhash.xxh3_64()
    digest.update(tokens)
    digest.update(payload)
    return f"{digest.intdigest():016x}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
