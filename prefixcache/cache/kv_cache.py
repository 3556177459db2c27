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
    the memory. With ``num_window_blocks`` (a hybrid KV cache) the sliding-window
    layers get pools of that many blocks instead, addressed by their own block ids
    (``WindowBlocks``), with rows of the same format.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str = "auto",
        num_window_blocks: int | None = None,
    ) -> None:
        row = row_width(config.head_dim, kv_cache_dtype)
        pool_dtype = code_dtype(kv_cache_dtype) or dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.window_layers = frozenset(config.sliding_layers if num_window_blocks else ())
        self.layers = []
        for layer in range(config.num_layers):
            count = num_window_blocks if layer in self.window_layers else num_blocks
            shape = (count, block_size, config.num_kv_heads, row)
            pools = (torch.zeros(shape, dtype=pool_dtype, device=device) for _ in range(2))
            self.layers.append(tuple(pools))

    @property
    def hybrid(self) -> bool:
        """Whether the sliding-window layers have pools of their own."""
        return bool(self.window_layers)

    @property
    def bytes(self) -> int:
        """Memory held by all pools."""
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes in every layer's pool, scales included (a hybrid
        cache's window layers hold only their windows' tokens)."""
        return sum(k[0, 0].numel() * k.element_size() * 2 for k, _ in self.layers)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """KV bytes one token costs across all layers, quantization scales included."""
    rows = 2 * config.num_layers * config.num_kv_heads
    return rows * row_bytes(config.head_dim, kv_cache_dtype, dtype)


def hybrid_kv_bytes(
    config: ModelConfig,
    dtype: torch.dtype,
    context: int,
    window_tokens: int,
    kv_cache_dtype: str = "auto",
) -> int:
    """KV bytes of a ``context``-token sequence when the sliding-window layers keep only
    ``window_tokens`` (their window plus the blocks in flight) and global layers all."""
    per_layer = 2 * config.num_kv_heads * row_bytes(config.head_dim, kv_cache_dtype, dtype)
    local = len(config.sliding_layers)
    tokens = (config.num_layers - local) * context + local * min(context, window_tokens)
    return tokens * per_layer
