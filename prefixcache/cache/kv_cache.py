"""The paged KV pools: one K and one V tensor per layer, shared by every request."""

from __future__ import annotations

import torch

from prefixcache.models.config import ModelConfig


class KVCache:
    """Per-layer pools of shape ``[num_blocks, block_size, kv_heads, head_dim]``.

    Block ids come from the block pool; this class only owns the memory.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(config.num_layers)
        ]

    @property
    def bytes(self) -> int:
        """Memory held by all pools."""
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes one token costs across all layers."""
    return config.kv_bytes_per_token * torch.empty((), dtype=dtype).element_size()
