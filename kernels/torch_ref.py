"""Reference paged attention in plain torch: exact, and the default on CPU.

It never builds a score matrix of new tokens x whole context: queries and keys are
processed in tiles and merged with an online (log-sum-exp) softmax, so a
200k-token context fits in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import AttentionBackend, register_backend
from kernels.metadata import AttentionMetadata

QUERY_TILE = 512
KEY_TILE = 16384
# Decode steps whose padded contexts stay under this many tokens run as one batched op.
BATCHED_DECODE_TOKENS = 1 << 18


@register_backend("torch")
class TorchReferenceBackend(AttentionBackend):
    """Tiled paged attention written with torch ops; GQA without repeating K/V."""

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        """Scatter new K/V rows into their slots."""
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(
            0, meta.slot_mapping, key.to(k_cache.dtype)
        )
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(
            0, meta.slot_mapping, value.to(v_cache.dtype)
        )

    def attend(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        """Attention of each sequence's new queries over its cached and new keys."""
        if meta.is_decode_only and _padded_tokens(meta) <= BATCHED_DECODE_TOKENS:
            return _batched_decode(query, k_cache, v_cache, meta, scale)
        out = torch.empty_like(query)
        start = 0
        for i, (n, total) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            out[start : start + n] = _attend_sequence(
                query[start : start + n], k_cache, v_cache, meta.block_tables[i], total, scale
            )
            start += n
        return out


def _padded_tokens(meta: AttentionMetadata) -> int:
    return meta.num_seqs * meta.block_tables.shape[1] * meta.block_size


def _batched_decode(query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """One query per sequence: gather padded contexts and attend in a single op."""
    num_seqs, heads, dim = query.shape
    tables = meta.block_tables.long()
    keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, kvh, S, d]
    values = v_cache[tables].flatten(1, 2).transpose(1, 2)
    positions = torch.arange(keys.shape[2], device=query.device)
    visible = positions[None, :] < meta.seq_lens[:, None].to(query.device)
    out = F.scaled_dot_product_attention(
        query.view(num_seqs, heads, 1, dim),
        keys,
        values,
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=heads != keys.shape[1],
    )
    return out.view(num_seqs, heads, dim)


def _attend_sequence(q, k_cache, v_cache, block_table, total: int, scale: float):
    """Attention for one sequence whose ``len(q)`` new tokens end its ``total``-token context."""
    n = q.shape[0]
    out = torch.empty_like(q)
    for q0 in range(0, n, QUERY_TILE):
        q1 = min(q0 + QUERY_TILE, n)
        first_pos = total - n + q0
        out[q0:q1] = _attend_tile(q[q0:q1], first_pos, k_cache, v_cache, block_table, scale)
    return out


def _attend_tile(q, first_pos: int, k_cache, v_cache, block_table, scale: float):
    """Queries at positions ``first_pos..`` over keys ``0..last query position``.

    Keys before ``first_pos`` need no mask and are taken ``KEY_TILE`` at a time; the
    tile's own keys get a square causal mask. Partial results merge by log-sum-exp.
    """
    t, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    qh = q.permute(1, 0, 2).unsqueeze(0)  # [1, heads, t, d]
    parts = []
    for k0 in range(0, first_pos, KEY_TILE):
        keys, values = _gather(k_cache, v_cache, block_table, k0, min(k0 + KEY_TILE, first_pos))
        parts.append(_attention_with_lse(qh, keys, values, group, scale, causal=False))
    keys, values = _gather(k_cache, v_cache, block_table, first_pos, first_pos + t)
    parts.append(_attention_with_lse(qh, keys, values, group, scale, causal=True))
    out = _merge(parts)  # [1, heads, t, d]
    return out[0].permute(1, 0, 2).to(q.dtype)


def _gather(k_cache, v_cache, block_table, k0: int, k1: int):
    """Keys and values of positions ``k0..k1`` as ``[1, kv_heads, k1 - k0, d]``."""
    block_size = k_cache.shape[1]
    first, last = k0 // block_size, (k1 + block_size - 1) // block_size
    blocks = block_table[first:last].long()
    offset = k0 - first * block_size
    keys = k_cache[blocks].flatten(0, 1)[offset : offset + k1 - k0]
    values = v_cache[blocks].flatten(0, 1)[offset : offset + k1 - k0]
    return keys.permute(1, 0, 2).unsqueeze(0), values.permute(1, 0, 2).unsqueeze(0)


def _attention_with_lse(q, keys, values, group: int, scale: float, causal: bool):
    """Softmax attention and its log-sum-exp; ``causal`` needs as many keys as queries."""
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    if _FUSED_CPU is not None and q.device.type == "cpu":
        out, lse = _FUSED_CPU(q, keys, values, 0.0, causal, scale=scale)
        return out.float(), lse
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    if causal:
        n = scores.shape[-1]
        upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(upper, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, values.float()), lse


def _merge(parts):
    """Combine attention over disjoint key sets, each given as (output, log-sum-exp)."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])  # [parts, 1, heads, t]
    weights = torch.softmax(lses, dim=0).unsqueeze(-1)
    return sum(w * out for w, (out, _) in zip(weights, parts, strict=True))


# The fused CPU kernel that also returns the log-sum-exp; absent in some torch builds.
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
