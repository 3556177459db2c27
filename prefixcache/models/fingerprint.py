"""A model fingerprint: two engines share cached KV only if their fingerprints match."""

from __future__ import annotations

import struct
from pathlib import Path

import xxhash

from prefixcache.models.loader import safetensors_files

_SAMPLE_BYTES = 1 << 16


def model_fingerprint(
    folder: Path,
    architecture: str,
    dtype: str,
    load_format: str,
    kv_cache_dtype: str = "auto",
    tensor_parallel_size: int = 1,
) -> str:
    """Hex digest over architecture, dtype, KV cache dtype, parallel layout, tokenizer
    files and the weights' identity: KV stored at one KV dtype is never read at another,
    nor KV stored by ranks of one tensor-parallel size by ranks of another (a chunk's
    data holds every rank's shard of its heads, in rank order).

    Weights are identified by each file's safetensors header (names, shapes, offsets),
    its size and samples of its bytes, so a multi-GB checkpoint is not read whole.
    """
    digest = xxhash.xxh3_128()
    for part in (architecture, dtype, load_format):
        digest.update(part.encode() + b"\0")
    if kv_cache_dtype != "auto":  # left out for auto: existing disk caches stay valid
        digest.update(b"kv_cache_dtype=" + kv_cache_dtype.encode() + b"\0")
    if tensor_parallel_size != 1:  # left out for one rank, like kv_cache_dtype auto
        digest.update(b"tensor_parallel_size=%d\0" % tensor_parallel_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            digest.update(path.read_bytes())
    if load_format != "dummy":
        for file in safetensors_files(folder):
            _update_with_weights(digest, file)
    return digest.hexdigest()


def _update_with_weights(digest, file: Path) -> None:
    size = file.stat().st_size
    digest.update(file.name.encode() + struct.pack("<Q", size))
    with file.open("rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        digest.update(handle.read(min(header_len, 1 << 24)))
        for offset in (size // 3, 2 * size // 3, max(size - _SAMPLE_BYTES, 0)):
            handle.seek(offset)
            digest.update(handle.read(_SAMPLE_BYTES))
