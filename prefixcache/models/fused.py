"""Fewer, in-place small ops for the decoder layers: rotary embedding tables made once
per step and shared by every layer, and the rotation applied in place.

A warm turn's new tokens are few, so each layer's elementwise ops cost little compute
but many calls; these keep the arithmetic of ``layers.RotaryEmbedding`` (the same
products and sums in the same order, so the same bits) in fewer ops.
"""

from __future__ import annotations

import torch

from prefixcache.engine.forward_context import ForwardContext
from prefixcache.models.layers import RotaryEmbedding


def rope_tables(
    rotary: RotaryEmbedding, positions: torch.Tensor, ctx: ForwardContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width ``cos`` and ``sin`` ``[tokens, 1, d / 2]`` of the step's positions.

    Made by the first layer whose rotary embedding has these frequencies and kept on
    the step's context for the others (a model may mix RoPE configs: Gemma 3's local
    and global layers).
    """
    key = _table_key(rotary)
    tables = ctx.rope_tables.get(key)
    if tables is None:
        cos, sin = rotary.cos_sin(positions, ctx.long_rope)
        half = cos.shape[-1] // 2  # rotate-half layout: both halves hold the same values
        tables = (cos[:, None, :half].contiguous(), sin[:, None, :half].contiguous())
        ctx.rope_tables[key] = tables
    return tables


def _table_key(rotary: RotaryEmbedding) -> tuple:
    """What the tables depend on besides positions, worked out once per module."""
    key = getattr(rotary, "_table_key", None)
    if key is None:
        long = rotary.long_inv_freq
        key = (
            rotary.inv_freq.cpu().numpy().tobytes(),
            None if long is None else long.cpu().numpy().tobytes(),
            rotary.long_from,
            rotary.attention_scaling,
        )
        rotary._table_key = key
    return key


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``x`` ``[tokens, heads, d]`` in place (rotate-half layout):
    ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin``."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x2_sin, x1_sin = x2 * sin, x1 * sin
    x1.mul_(cos).sub_(x2_sin)
    x2.mul_(cos).add_(x1_sin)
