"""Reference paged attention in plain torch: exact, and the default on CPU.

It never builds a score matrix of new tokens x whole context: queries and keys are
processed in tiles and merged with an online (log-sum-exp) softmax, so a
200k-token context fits in memory.
"""

from __future__ import annotations

import torch

from kernels.backend import AttentionBackend, register_backend
from kernels.metadata import AttentionMetadata

QUERY_TILE = 512
KEY_TILE = 4096
# Decode steps whose padded contexts stay under this many tokens run as one batched op.
BATCHED_DECODE_TOKENS = 1 << 18


@register_backend("torch")
class TorchReferenceBackend(AttentionBackend):
    """Tiled paged attention written with torch ops; GQA without repeating K/V."""

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        """Scatter new K/V rows into their slots."""
        k_cache.view(-1, *k_cache.shape[2:])[meta.slot_mapping] = key.to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[meta.slot_mapping] = value.to(v_cache.dtype)

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
    kv_heads = k_cache.shape[2]
    keys = k_cache[meta.block_tables.long()].flatten(1, 2).float()  # [B, S, kvh, d]
    values = v_cache[meta.block_tables.long()].flatten(1, 2).float()
    q = query.float().view(num_seqs, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,bskd->bkgs", q, keys) * scale
    positions = torch.arange(keys.shape[1], device=query.device)
    beyond = positions[None, :] >= meta.seq_lens[:, None].to(positions.device)
    scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgs,bskd->bkgd", probs, values)
    return out.reshape(num_seqs, heads, dim).to(query.dtype)


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
    """Queries at positions ``first_pos..`` over keys ``0..last query position``."""
    t, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    qg = q.float().view(t, kv_heads, group, dim).permute(1, 2, 0, 3)  # [kvh, g, t, d]
    key_end = first_pos + t
    q_pos = torch.arange(first_pos, key_end, device=q.device)
    state = None
    for k0 in range(0, key_end, KEY_TILE):
        k1 = min(k0 + KEY_TILE, key_end)
        keys, values = _gather(k_cache, v_cache, block_table, k0, k1)
        scores = torch.einsum("kgtd,skd->kgts", qg, keys) * scale
        if k1 > first_pos:  # the tile reaches the new tokens: causal mask
            k_pos = torch.arange(k0, k1, device=q.device)
            scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        state = _merge(state, scores, values)
    m, denom, acc = state
    out = acc / denom.unsqueeze(-1)  # [kvh, g, t, d]
    return out.permute(2, 0, 1, 3).reshape(t, heads, dim).to(q.dtype)


def _gather(k_cache, v_cache, block_table, k0: int, k1: int):
    block_size = k_cache.shape[1]
    first, last = k0 // block_size, (k1 + block_size - 1) // block_size
    blocks = block_table[first:last].long()
    offset = k0 - first * block_size
    keys = k_cache[blocks].flatten(0, 1)[offset : offset + k1 - k0]
    values = v_cache[blocks].flatten(0, 1)[offset : offset + k1 - k0]
    return keys.float(), values.float()


def _merge(state, scores, values):
    """Fold one key tile into the running (max, denominator, accumulator) triple."""
    tile_max = scores.amax(dim=-1)
    if state is None:
        probs = torch.exp(scores - tile_max.unsqueeze(-1))
        return tile_max, probs.sum(-1), torch.einsum("kgts,skd->kgtd", probs, values)
    m, denom, acc = state
    new_m = torch.maximum(m, tile_max)
    probs = torch.exp(scores - new_m.unsqueeze(-1))
    correction = torch.exp(m - new_m)
    denom = denom * correction + probs.sum(-1)
    acc = acc * correction.unsqueeze(-1) + torch.einsum("kgts,skd->kgtd", probs, values)
    return new_m, denom, acc
