"""The file format of one stored chunk of KV on disk, and its verification.

Layout: a 16-byte prefix (magic, format version, header length); a JSON header (model
fingerprint, chunk key, digest of the prefix before the chunk, start position, dtype,
shape, payload size, and an xxh3 checksum of tokens and payload); the chunk's token ids
as little-endian int32; then the KV payload ``[layers, 2, num_blocks, block_size,
kv_heads, head_dim]`` in the header's dtype, where ``num_blocks`` is the whole chunk or
its first blocks. A quantized KV cache (header ``kv_cache_dtype`` int8 or fp8, dtype
int8 or float8_e4m3fn) stores rows of ``head_dim`` codes followed by their float16
scale, so the last dimension is ``head_dim + 2`` and the scales travel with the bytes
(``kernels.kv_quant``). ``decode`` checks every part against what the reader expects, so a
file that is truncated, corrupt or written by another model or layout raises
``ChunkFileError``. ``decode_head`` reads the names and tokens alone, to choose among
files before reading one whole."""

from __future__ import annotations

import json
import math
import struct
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from chunking.hashing import TOKEN_DTYPE
from kernels.kv_quant import kv_format
from prefixcache.tiers.base import KVChunk

MAGIC = b"PCKVCHNK"
VERSION = 1
PREFIX = struct.Struct("<8sII")  # magic, version, header length
_MAX_HEADER = 1 << 16


class ChunkFileError(ValueError):
    """A chunk file that cannot be trusted: wrong magic, version, model, shape or bytes."""


class ChunkLayout(NamedTuple):
    """What every chunk file of one engine agrees on."""

    fingerprint: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # (layers, 2, blocks_per_chunk, block_size, kv_heads, head_dim)

    @property
    def block_size(self) -> int:
        """Tokens per KV block."""
        return self.shape[3]

    @property
    def chunk_size(self) -> int:
        """Tokens per whole chunk."""
        return self.shape[2] * self.shape[3]

    def data_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The payload shape of a chunk of ``num_blocks`` blocks."""
        return (*self.shape[:2], num_blocks, *self.shape[3:])

    def payload_bytes(self, num_blocks: int) -> int:
        """Bytes of the KV of ``num_blocks`` blocks."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return math.prod(self.data_shape(num_blocks)) * itemsize

    def file_bytes(self, num_blocks: int) -> int:
        """Bytes of a file of ``num_blocks`` blocks, without its JSON header."""
        tokens = num_blocks * self.block_size * TOKEN_DTYPE.itemsize
        return PREFIX.size + tokens + self.payload_bytes(num_blocks)


class ChunkHead(NamedTuple):
    """A file's names and tokens, read and checked without its payload."""

    key: int
    parent: bytes
    start: int
    tokens: np.ndarray
    header_bytes: int


def encode(layout: ChunkLayout, chunk: KVChunk) -> list[bytes | memoryview]:
    """The pieces of a chunk file, in order (write them one after another)."""
    tokens = np.ascontiguousarray(chunk.tokens, dtype=TOKEN_DTYPE)
    num_blocks, rest = divmod(len(tokens), layout.block_size)
    if not 0 < num_blocks <= layout.shape[2] or rest:
        raise ValueError(f"a stored chunk has 1 to {layout.shape[2]} whole blocks of tokens")
    data = chunk.data.cpu().contiguous()
    if tuple(data.shape) != layout.data_shape(num_blocks) or data.dtype != layout.dtype:
        raise ValueError(f"chunk data is {tuple(data.shape)} {data.dtype}, layout wants {layout}")
    payload = memoryview(data.reshape(-1).view(torch.uint8).numpy())
    header = json.dumps(
        {
            "fingerprint": layout.fingerprint,
            "hash": f"{chunk.key:016x}",
            "parent": chunk.parent.hex(),
            "start": chunk.start,
            "dtype": _dtype_name(layout.dtype),
            "kv_cache_dtype": kv_format(layout.dtype),
            "shape": list(data.shape),
            "payload_bytes": len(payload),
            "xxh3": _checksum(memoryview(tokens), payload),
        },
        sort_keys=True,
    ).encode()
    return [PREFIX.pack(MAGIC, VERSION, len(header)), header, tokens.tobytes(), payload]


def header_length(prefix: bytes | bytearray) -> int:
    """The JSON header's length, from a file's first ``PREFIX.size`` bytes."""
    if len(prefix) < PREFIX.size:
        raise ChunkFileError(f"truncated: {len(prefix)} bytes")
    magic, version, length = PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise ChunkFileError("not a chunk file (bad magic)")
    if version != VERSION:
        raise ChunkFileError(f"format version {version}, expected {VERSION}")
    if length > _MAX_HEADER:
        raise ChunkFileError(f"header of {length} bytes")
    return length


def decode_head(layout: ChunkLayout, raw: bytes | bytearray) -> ChunkHead:
    """Names and tokens from the start of a file (prefix, header, tokens; the payload may
    be missing); raises ``ChunkFileError`` on a header this layout cannot read."""
    return _decode_head(layout, raw)[0]


def decode(layout: ChunkLayout, raw: bytearray) -> KVChunk:
    """Parse and verify a whole chunk file; raises ``ChunkFileError`` on any mismatch."""
    head, header = _decode_head(layout, raw)
    num_blocks = len(head.tokens) // layout.block_size
    if len(raw) != layout.file_bytes(num_blocks) + head.header_bytes:
        raise ChunkFileError(f"truncated or oversized: {len(raw)} bytes")
    view = memoryview(raw)
    offset = PREFIX.size + head.header_bytes
    tokens_end = offset + len(head.tokens) * TOKEN_DTYPE.itemsize
    if _checksum(view[offset:tokens_end], view[tokens_end:]) != header["xxh3"]:
        raise ChunkFileError("checksum mismatch")
    payload = len(raw) - tokens_end
    flat = torch.frombuffer(raw, dtype=torch.uint8, offset=tokens_end, count=payload)
    data = flat.view(layout.dtype).view(layout.data_shape(num_blocks))
    return KVChunk(head.key, head.parent, head.start, head.tokens, data)


def _decode_head(layout: ChunkLayout, raw: bytes | bytearray) -> tuple[ChunkHead, dict]:
    length = header_length(raw)
    header = _header(raw[PREFIX.size : PREFIX.size + length])
    num_blocks = _check_header(layout, header)
    offset = PREFIX.size + length
    count = num_blocks * layout.block_size
    if len(raw) < offset + count * TOKEN_DTYPE.itemsize:
        raise ChunkFileError(f"truncated: {len(raw)} bytes")
    tokens = np.frombuffer(raw, TOKEN_DTYPE, count, offset).copy()
    parent = bytes.fromhex(header["parent"])
    head = ChunkHead(int(header["hash"], 16), parent, header["start"], tokens, length)
    return head, header


def _header(raw: bytes | bytearray) -> dict:
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChunkFileError(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise ChunkFileError("header is not an object")
    return header


def _check_header(layout: ChunkLayout, header: dict) -> int:
    """Check ``header`` against ``layout``; returns the chunk's number of blocks."""
    for key, value in (("fingerprint", layout.fingerprint), ("dtype", _dtype_name(layout.dtype))):
        if header.get(key) != value:
            raise ChunkFileError(f"{key} is {header.get(key)!r}, expected {value!r}")
    stored = header.get("kv_cache_dtype", "auto")  # files from before quantization: auto
    if stored != kv_format(layout.dtype):
        raise ChunkFileError(f"kv_cache_dtype is {stored!r}, expected {kv_format(layout.dtype)!r}")
    shape = header.get("shape")
    num_blocks = shape[2] if isinstance(shape, list) and len(shape) == len(layout.shape) else 0
    if not isinstance(num_blocks, int) or not 0 < num_blocks <= layout.shape[2]:
        raise ChunkFileError(f"shape is {shape!r}, expected {list(layout.shape)} or fewer blocks")
    expected = {"shape": list(layout.data_shape(num_blocks))}
    expected["payload_bytes"] = layout.payload_bytes(num_blocks)
    for key, value in expected.items():
        if header.get(key) != value:
            raise ChunkFileError(f"{key} is {header.get(key)!r}, expected {value!r}")
    try:
        int(header["hash"], 16), bytes.fromhex(header["parent"]), str(header["xxh3"])
        if not isinstance(header["start"], int) or header["start"] < 0:
            raise ValueError("bad start")
    except (KeyError, TypeError, ValueError) as exc:
        raise ChunkFileError(f"bad header field: {exc}") from None
    return num_blocks


def _checksum(tokens: memoryview, payload: memoryview) -> str:
    digest = xxhash.xxh3_64()
    digest.update(tokens)
    digest.update(payload)
    return f"{digest.intdigest():016x}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
