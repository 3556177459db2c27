"""Reference paged attention in plain torch: exact, and the default on CPU.

It never builds a score matrix of new tokens x whole context. Each sequence's cached
keys are read in place, one strided view per run of consecutive blocks (gathered
only when the blocks are scattered), in pieces of at most ``KEY_TILE`` tokens; the
new tokens attend causally to themselves; partial results merge by log-sum-exp. So
a 200k-token context fits in memory and a long decode step copies no KV.

Decode steps in float32 go to a small C kernel (``kernels.cpu_native``) when the
machine can build it: one call for the whole batch, each sequence's blocks streamed
in place. Prefill steps in float32 (no window, no score cap) go to its prefill
counterpart (``kernels.cpu_prefill``): one call per layer over cached and new keys
together, GQA rows sharing each key tile. Everything else, and every step without
those kernels, is torch ops.

Quantized pools (int8/fp8 rows with scales, ``kernels.kv_quant``) take the same paths:
decode steps go to the C kernel's int8/fp8 variant (``kernels.cpu_quant``), which
dequantizes inside its dot products; the torch ops dequantize each piece as it is read.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from kernels.backend import AttentionBackend, check_window, register_backend
from kernels.cpu_native import decode_attention
from kernels.cpu_prefill import prefill_attention
from kernels.cpu_quant import decode_attention_quant
from kernels.kv_quant import dequantize, is_quantized, write_quantized
from kernels.metadata import AttentionMetadata
from kernels.torch_window import windowed_attention

QUERY_TILE = 512
KEY_TILE = 16384  # bounds copies and, without the fused kernel, score matrices
# Decode steps whose contexts are all this short are gathered and run as one op.
BATCHED_DECODE_MAX_LEN = 2048
# Runs of at least this many consecutive blocks are read in place; shorter runs (the
# blocks a decode step appends, a fragmented pool) are gathered into one piece.
LONG_RUN_BLOCKS = 8


@register_backend("torch")
class TorchReferenceBackend(AttentionBackend):
    """Paged attention written with torch ops; GQA without repeating cached K/V."""

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        """Scatter new K/V rows into their slots (quantized first for int8/fp8 pools)."""
        if is_quantized(k_cache):
            write_quantized(key, value, k_cache, v_cache, meta.slot_mapping)
            return
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(
            0, meta.slot_mapping, key.to(k_cache.dtype)
        )
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(
            0, meta.slot_mapping, value.to(v_cache.dtype)
        )

    def attend(
        self,
        query,
        k_cache,
        v_cache,
        meta: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ):
        """Attention of each sequence's new queries over its cached and new keys."""
        check_window(sliding_window, softcap)
        quantized = is_quantized(k_cache)
        if meta.is_decode_only:
            native = _native_decode_quant if quantized else _native_decode
            out = native(query, k_cache, v_cache, meta, scale, sliding_window, softcap)
            if out is not None:
                return out
        if sliding_window is not None or softcap is not None:
            return windowed_attention(
                query, k_cache, v_cache, meta, scale, sliding_window, softcap,
                QUERY_TILE, KEY_TILE,
            )  # fmt: skip
        if meta.is_decode_only and max(meta.seq_lens_cpu) <= BATCHED_DECODE_MAX_LEN:
            return _batched_decode(query, k_cache, v_cache, meta, scale)
        if not quantized and not meta.is_decode_only:
            out = prefill_attention(
                query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                meta.query_start_loc, scale,
            )  # fmt: skip
            if out is not None:
                return out
        out = torch.empty_like(query)
        start = 0
        context_type = _QuantContext if quantized else _Context
        for i, (n, total) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            context = context_type(k_cache, v_cache, meta, i)
            out[start : start + n] = _attend_sequence(
                query[start : start + n], context, total, scale
            )
            start += n
        return out


def _native_decode(query, k_cache, v_cache, meta: AttentionMetadata, scale, window, softcap):
    """The C decode kernel (``kernels.cpu_native``) for float32 on CPU, else None."""
    on_cpu = query.device.type == "cpu" and k_cache.device.type == "cpu"
    if not on_cpu or query.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return None
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    return decode_attention(
        query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
        sliding_window=window, softcap=softcap,
    )  # fmt: skip


def _native_decode_quant(query, k_cache, v_cache, meta: AttentionMetadata, scale, window, softcap):
    """The C kernel for int8/fp8 pools (``kernels.cpu_quant``), else None."""
    on_cpu = query.device.type == "cpu" and k_cache.device.type == "cpu"
    if not on_cpu or query.dtype != torch.float32:
        return None
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    return decode_attention_quant(
        query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window, softcap
    )


def _values(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V rows as values: dequantized if the pool is quantized, else as they are."""
    return dequantize(rows, dtype) if is_quantized(rows) else rows


def _batched_decode(query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """One query per short sequence: gather padded contexts and attend in a single op."""
    num_seqs, heads, dim = query.shape
    tables = meta.block_tables.long()
    keys = _values(k_cache[tables], query.dtype).flatten(1, 2).transpose(1, 2)  # [B, kvh, S, d]
    values = _values(v_cache[tables], query.dtype).flatten(1, 2).transpose(1, 2)
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


class _Context:
    """One sequence's cached K/V, read as ``[1, kv_heads, length, d]`` pieces."""

    def __init__(self, k_cache, v_cache, meta: AttentionMetadata, seq: int) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        self.block_size = k_cache.shape[1]
        self.runs = meta.block_runs(seq)
        self.table = meta.block_tables[seq]
        # Token-level views of the pools (they are contiguous): a run is one slice.
        self.flat_k, self.flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
        # A view costs no memory and the fused kernel never materializes scores, so
        # with it a whole run is one piece; otherwise runs are cut to KEY_TILE.
        fused = _FUSED_CPU is not None and k_cache.device.type == "cpu"
        self.view_tile = 1 << 40 if fused else KEY_TILE

    def pieces(self, end: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of positions ``0..end`` in any order (attention over them is
        unmasked, so order does not matter): long runs of blocks as views, the blocks of
        short runs gathered together, ``KEY_TILE`` tokens at most per gathered piece."""
        bs, position, short = self.block_size, 0, []
        for first, count in self.runs:
            length = min(count * bs, end - position)
            if length <= 0:
                break
            if count >= LONG_RUN_BLOCKS:
                for offset in range(0, length, self.view_tile):
                    yield self._view(first, offset, min(self.view_tile, length - offset))
            else:
                short.append((first * bs, length))
            position += count * bs
        if short:
            slots = _slot_ranges(short)
            for k0 in range(0, len(slots), KEY_TILE):
                yield self._take(slots[k0 : k0 + KEY_TILE])

    def _take(self, slots: torch.Tensor):
        """The K/V rows at pool token ``slots``, as ``[1, kv_heads, len, d]``."""
        slots = slots.to(self.flat_k.device)
        return tuple(
            flat.index_select(0, slots).transpose(0, 1).unsqueeze(0)
            for flat in (self.flat_k, self.flat_v)
        )

    def _view(self, first_block: int, offset: int, length: int):
        """``length`` tokens from ``offset`` into the run starting at ``first_block``."""
        start = first_block * self.block_size + offset
        keys = self.flat_k[start : start + length].transpose(0, 1).unsqueeze(0)
        values = self.flat_v[start : start + length].transpose(0, 1).unsqueeze(0)
        return keys, values

    @property
    def _caches(self):
        return (self.k_cache, self.v_cache)

    def gather(self, k0: int, k1: int):
        """Keys and values of positions ``k0..k1``, copied out of their blocks."""
        first, last = k0 // self.block_size, -(-k1 // self.block_size)
        blocks = self.table[first:last].long()
        offset = k0 - first * self.block_size
        return tuple(
            c.index_select(0, blocks)
            .flatten(0, 1)[offset : offset + k1 - k0]
            .transpose(0, 1)
            .unsqueeze(0)
            for c in self._caches
        )


class _QuantContext(_Context):
    """A context over int8/fp8 pools: each piece is dequantized as it is read, at most
    ``KEY_TILE`` tokens at a time, so no full-precision copy of the context is made."""

    def __init__(self, k_cache, v_cache, meta: AttentionMetadata, seq: int) -> None:
        super().__init__(k_cache, v_cache, meta, seq)
        self.view_tile = KEY_TILE

    def _take(self, slots: torch.Tensor):
        return tuple(dequantize(rows) for rows in super()._take(slots))

    def _view(self, first_block: int, offset: int, length: int):
        return tuple(dequantize(rows) for rows in super()._view(first_block, offset, length))

    def gather(self, k0: int, k1: int):
        """Keys and values of positions ``k0..k1``, dequantized."""
        return tuple(dequantize(rows) for rows in super().gather(k0, k1))


def _slot_ranges(ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Concatenated ``start..start+length`` ranges of pool token slots."""
    starts = np.array([r[0] for r in ranges], dtype=np.int64)
    lengths = np.array([r[1] for r in ranges], dtype=np.int64)
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return torch.from_numpy(shift + np.arange(int(lengths.sum())))


def _attend_sequence(q, context: _Context, total: int, scale: float):
    """Attention for one sequence whose ``len(q)`` new tokens end its ``total``-token context."""
    n = q.shape[0]
    out = torch.empty_like(q)
    for q0 in range(0, n, QUERY_TILE):
        q1 = min(q0 + QUERY_TILE, n)
        out[q0:q1] = _attend_tile(q[q0:q1], total - n + q0, context, scale)
    return out


def _attend_tile(q, first_pos: int, context: _Context, scale: float):
    """Queries at positions ``first_pos..`` over keys ``0..last query position``.

    Keys before ``first_pos`` need no mask, so each query head group is folded into
    the query length and reads its shared K/V head directly; the tile's own keys get
    a square causal mask.
    """
    t, heads, dim = q.shape
    kv_heads = context.k_cache.shape[2]
    group = heads // kv_heads
    # One new token sees all its keys: no mask at all, its own key read in place too.
    unmasked_end = first_pos + 1 if t == 1 else first_pos
    parts = []
    if unmasked_end > 0:
        folded = q.view(t, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, dim)
        for keys, values in context.pieces(unmasked_end):
            out, lse = _attention_with_lse(folded, keys, values, scale, causal=False)
            parts.append((out.reshape(1, heads, t, dim), lse.reshape(1, heads, t)))
    if t == 1:
        return _merge(parts)[0].permute(1, 0, 2).to(q.dtype)
    keys, values = context.gather(first_pos, first_pos + t)
    if group > 1:
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    qh = q.permute(1, 0, 2).unsqueeze(0)  # [1, heads, t, d]
    parts.append(_attention_with_lse(qh, keys, values, scale, causal=True))
    return _merge(parts)[0].permute(1, 0, 2).to(q.dtype)


def _attention_with_lse(q, keys, values, scale: float, causal: bool):
    """Softmax attention and its log-sum-exp; ``causal`` needs as many keys as queries."""
    if _FUSED_CPU is not None and q.device.type == "cpu":
        out, lse = _FUSED_CPU(q, keys.to(q.dtype), values.to(q.dtype), 0.0, causal, scale=scale)
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
