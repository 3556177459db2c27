"""The paged KV pools: one K and one V tensor per layer, shared by every request."""

from __future__ import annotations

import torch

from kernels.kv_quant import code_dtype, row_bytes, row_width
from prefixcache.models.config import ModelConfig


class KVCache:
    """Per-layer pools of shape ``[num_blocks, block_size, kv_heads, row]``.

    ``row`` is the head dim at the model's dtype, or, with ``kv_cache_dtype`` ``int8``
    or ``fp8``, the head dim's one-byte codes plus their float16 scale (see
    ``kernels.kv_quant``). Block ids come from the block pool; this class only owns
    the memory.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str = "auto",
    ) -> None:
        row = row_width(config.head_dim, kv_cache_dtype)
        shape = (num_blocks, block_size, config.num_kv_heads, row)
        pool_dtype = code_dtype(kv_cache_dtype) or dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.layers = [
            (
                torch.zeros(shape, dtype=pool_dtype, device=device),
                torch.zeros(shape, dtype=pool_dtype, device=device),
            )
            for _ in range(config.num_layers)
        ]

    @property
    def bytes(self) -> int:
        """Memory held by all pools."""
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one cached token takes across all layers, scales included."""
        return self.bytes // (self.num_blocks * self.block_size)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """KV bytes one token costs across all layers, quantization scales included."""
    rows = 2 * config.num_layers * config.num_kv_heads
    return rows * row_bytes(config.head_dim, kv_cache_dtype, dtype)
