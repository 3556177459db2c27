"""Torch attention for sliding-window layers and soft-capped scores.

The torch reference backend hands a step here when a layer has a window or a score
cap. A query tile at positions ``p0..p1`` reads only keys ``p0-W+1..p1``: the blocks
wholly before the window are never touched, so a hybrid KV cache may already have
given them back to the pool. Keys are read in pieces of at most ``key_tile`` tokens
and the pieces merge by log-sum-exp, so memory stays bounded for global layers with
a cap over a long context too. Quantized pools (``kernels.kv_quant``) are
dequantized piece by piece as they are read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.kv_quant import dequantize, is_quantized
from kernels.metadata import AttentionMetadata


def windowed_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    query_tile: int,
    key_tile: int,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries with a window and/or a score cap."""
    out = torch.empty_like(query)
    start = 0
    for i, (n, total) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        table = meta.block_tables[i]
        for q0 in range(0, n, query_tile):
            q1 = min(q0 + query_tile, n)
            rows = slice(start + q0, start + q1)
            spec = _Tile(total - n + q0, q1 - q0, sliding_window, softcap, scale)
            out[rows] = _attend_tile(query[rows], k_cache, v_cache, table, spec, key_tile)
        start += n
    return out


class _Tile:
    """Positions of a query tile and what it may see."""

    __slots__ = ("first", "count", "window", "softcap", "scale")

    def __init__(self, first, count, window, softcap, scale) -> None:
        self.first, self.count, self.window = first, count, window
        self.softcap, self.scale = softcap, scale

    @property
    def key_start(self) -> int:
        """The first key any row of the tile sees."""
        return 0 if self.window is None else max(0, self.first - self.window + 1)

    @property
    def key_end(self) -> int:
        """One past the last key the tile's last row sees (its own)."""
        return self.first + self.count


def _attend_tile(q, k_cache, v_cache, table, tile: _Tile, key_tile: int) -> torch.Tensor:
    if tile.softcap is None and tile.key_end - tile.key_start <= key_tile:
        return _fused_tile(q, k_cache, v_cache, table, tile)
    t, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    folded = q.float().view(t, kv_heads, group, dim).permute(1, 2, 0, 3)  # [kvh, g, t, d]
    q_pos = torch.arange(tile.first, tile.key_end, device=q.device)
    parts = []
    for k0 in range(tile.key_start, tile.key_end, key_tile):
        k1 = min(k0 + key_tile, tile.key_end)
        keys = _as_float(_gather(k_cache, table, k0, k1))  # [kvh, L, d]
        values = _as_float(_gather(v_cache, table, k0, k1))
        scores = torch.matmul(folded, keys.unsqueeze(1).transpose(-1, -2)) * tile.scale
        if tile.softcap is not None:
            scores = torch.tanh(scores / tile.softcap) * tile.softcap
        k_pos = torch.arange(k0, k1, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        if tile.window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - tile.window
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees no key of this piece
        probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1))
        parts.append((torch.matmul(probs, values.unsqueeze(1)), lse))
    out = _merge(parts)  # [kvh, g, t, d]
    return out.permute(2, 0, 1, 3).reshape(t, heads, dim).to(q.dtype)


def _fused_tile(q, k_cache, v_cache, table, tile: _Tile) -> torch.Tensor:
    """Uncapped scores over one piece of keys: torch's fused attention with a mask."""
    keys = _gather(k_cache, table, tile.key_start, tile.key_end).unsqueeze(0)
    values = _gather(v_cache, table, tile.key_start, tile.key_end).unsqueeze(0)
    q_pos = torch.arange(tile.first, tile.key_end, device=q.device)
    k_pos = torch.arange(tile.key_start, tile.key_end, device=q.device)
    visible = k_pos[None, :] <= q_pos[:, None]
    if tile.window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - tile.window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        _as_float(keys, q.dtype),
        _as_float(values, q.dtype),
        attn_mask=visible,
        scale=tile.scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )
    return out[0].transpose(0, 1)


def _gather(cache: torch.Tensor, table: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Rows of positions ``k0..k1`` as ``[kv_heads, k1-k0, d]``; reads only their blocks."""
    block_size = cache.shape[1]
    first, last = k0 // block_size, -(-k1 // block_size)
    blocks = table[first:last].long().to(cache.device)
    offset = k0 - first * block_size
    return cache.index_select(0, blocks).flatten(0, 1)[offset : offset + k1 - k0].transpose(0, 1)


def _as_float(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gathered rows in ``dtype``: dequantized if the pool holds int8/fp8 rows."""
    return dequantize(rows, dtype) if is_quantized(rows) else rows.to(dtype)


def _merge(parts):
    """Combine attention over disjoint key sets given as (output, log-sum-exp) pairs."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])
    weights = torch.softmax(lses, dim=0).nan_to_num(0.0).unsqueeze(-1)
    return sum(w * out for w, (out, _) in zip(weights, parts, strict=True))
