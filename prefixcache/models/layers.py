"""Building blocks shared by the Llama-family models."""

from __future__ import annotations

import torch
from torch import nn

from prefixcache.models.parallel_layers import RowParallelLinear, merged_column_linear
from prefixcache.models.rope import RopeConfig, rope_frequencies


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference models."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension of ``x``."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) with the scalings of ``models.rope``."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        # Plain attributes, not buffers: derived from the config, never loaded, and they
        # must survive models built on the meta device.
        tables = rope_frequencies(head_dim, rope)
        self.inv_freq, self.long_inv_freq = tables.inv_freq, tables.long_inv_freq
        self.long_from, self.attention_scaling = tables.long_from, tables.attention_scaling

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        long_rope: torch.Tensor | None = None,
    ):
        """Rotate ``q`` ``[tokens, heads, d]`` and ``k`` by their token positions;
        ``long_rope`` marks tokens that take LongRoPE's long factors at any position."""
        cos, sin = self.cos_sin(positions, long_rope)
        cos, sin = cos[:, None, :].to(q.dtype), sin[:, None, :].to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def cos_sin(
        self, positions: torch.Tensor, long_rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 ``cos`` and ``sin`` ``[tokens, d]``, attention scaling included."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        inv_freq = self.inv_freq[None, :]
        if self.long_inv_freq is not None:
            # LongRoPE: past the original length, or for a request run long throughout
            # (see models.rope), the long factors.
            self.long_inv_freq = self.long_inv_freq.to(positions.device)
            is_long = positions >= self.long_from
            if long_rope is not None:
                is_long = is_long | long_rope
            is_long = is_long[:, None]
            inv_freq = torch.where(is_long, self.long_inv_freq[None, :], inv_freq)
        freqs = positions.float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class GatedMLP(nn.Module):
    """SwiGLU feed-forward with the gate and up projections fused into one matmul.

    Tensor-parallel: gate/up column-parallel, down row-parallel; ``reduce=False`` leaves
    the all-reduce to the caller (a MoE block sums its shared expert with the experts).
    """

    def __init__(self, hidden: int, intermediate: int, reduce: bool = True) -> None:
        super().__init__()
        sizes = (intermediate, intermediate)
        self.gate_up_proj = merged_column_linear(hidden, sizes, "intermediate_size")
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward block."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)
