"""Cutting token ids into hash chunks: chained xxh3 hashes salted per model and tenant."""

from chunking.hashing import (
    TOKEN_DTYPE,
    ChunkHasher,
    as_token_array,
    chunk_hashes,
    root_seed,
)

__all__ = ["TOKEN_DTYPE", "ChunkHasher", "as_token_array", "chunk_hashes", "root_seed"]
