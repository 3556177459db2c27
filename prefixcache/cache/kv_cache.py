"""The paged KV pools: one K and one V tensor per layer, shared by every request."""

from __future__ import annotations

import torch

from prefixcache.models.config import ModelConfig


class KVCache:
    """Per-layer pools of shape ``[num_blocks, block_size, kv_heads, head_dim]``.

    Block ids come from the block pool; this class only owns the memory. With
    ``num_window_blocks`` (a hybrid KV cache) the sliding-window layers get pools of
    that many blocks instead, addressed by their own block ids (``WindowBlocks``).
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_window_blocks: int | None = None,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.window_layers = frozenset(config.sliding_layers if num_window_blocks else ())
        self.layers = []
        for layer in range(config.num_layers):
            count = num_window_blocks if layer in self.window_layers else num_blocks
            shape = (count, block_size, config.num_kv_heads, config.head_dim)
            pools = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
            self.layers.append(tuple(pools))

    @property
    def hybrid(self) -> bool:
        """Whether the sliding-window layers have pools of their own."""
        return bool(self.window_layers)

    @property
    def bytes(self) -> int:
        """Memory held by all pools."""
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)


def hybrid_kv_bytes(
    config: ModelConfig, dtype: torch.dtype, context: int, window_tokens: int
) -> int:
    """KV bytes of a ``context``-token sequence when the sliding-window layers keep only
    ``window_tokens`` (their window plus the blocks in flight) and global layers all."""
    per_layer = 2 * config.num_kv_heads * config.head_dim
    local = len(config.sliding_layers)
    tokens = (config.num_layers - local) * context + local * min(context, window_tokens)
    return tokens * per_layer * torch.empty((), dtype=dtype).element_size()


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes one token costs across all layers."""
    return config.kv_bytes_per_token * torch.empty((), dtype=dtype).element_size()
