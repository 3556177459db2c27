"""Triton kernels for paged attention: KV write, prefill over a cached prefix, split-K decode.

All kernels read the per-layer pools ``[num_blocks, block_size, kv_heads, head_dim]``
in place through the block table; nothing is gathered into contiguous K/V.

GQA: one program serves all query heads of one KV head. Its tile rows are
``(token, head in group)`` pairs, so each K/V tile is loaded once for the whole group
and K/V are never repeated in memory. ``head_dim`` is padded to a power of two
(``BLOCK_D``, at least 16 for ``tl.dot``) with masks, so 16, 64, 128 and other sizes
all work.

Softmax runs online in base 2: scores are scaled by ``scale * log2(e)`` and merged
with ``exp2``, which is exact up to rounding and cheaper than ``exp``.

Sliding windows (``WINDOW`` > 0 keys per query, its own included) start each tile
loop at the first key the tile's first row sees and mask per row; blocks before that
are never read. A score cap (``SOFTCAP``: ``c * tanh(s / c)``) is applied in base 2
too, to ``c * log2(e)``.

This module imports triton; ``kernels.triton_backend`` imports it lazily so that the
registry works on machines without triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy ``BLOCK_T`` tokens' K and V rows (all KV heads) to their slots; slot -1 skips."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_H * BLOCK_D)
    head = cols // BLOCK_D
    dim = cols % BLOCK_D
    slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    ok = (slot >= 0)[:, None] & ((head < KV_HEADS) & (dim < HEAD_DIM))[None, :]
    row = tok.to(tl.int64)[:, None]
    dst = (slot // BLOCK_SIZE * stride_cb + slot % BLOCK_SIZE * stride_cs)[:, None]
    dst = dst + (head * stride_ch + dim)[None, :]
    k = tl.load(key_ptr + row * stride_kt + (head * stride_kh + dim)[None, :], mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    v = tl.load(value_ptr + row * stride_vt + (head * stride_vh + dim)[None, :], mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_queries(q_ptr, first_row, rows_left, kvh, stride_qt, stride_qh, dims, d_ok,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Tile rows are ``(token, head in group)``; returns the tile, row token, head, mask."""
    rows = tl.arange(0, BLOCK_M)
    tok = rows // GROUP_PAD
    head = kvh * GROUP + rows % GROUP_PAD
    row_ok = (tok < rows_left) & (rows % GROUP_PAD < GROUP)
    offs = (first_row + tok).to(tl.int64)[:, None] * stride_qt + (head * stride_qh)[:, None]
    q = tl.load(q_ptr + offs + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return q, tok, head, row_ok


@triton.jit
def _dequantize(codes, lut_ptr, scale_base, row_offs, row_ok, HEAD_DIM: tl.constexpr):
    """Quantized rows' codes (bytes) as floats: the code's value from the 256-entry
    table, times the row's float16 scale stored after its ``HEAD_DIM`` codes. Rows not
    ``row_ok`` (before a window, past the context) get scale 0 and are never read."""
    scale = tl.load(scale_base + (row_offs + HEAD_DIM) // 2, mask=row_ok, other=0.0)
    scale = scale.to(tl.float32)
    return tl.load(lut_ptr + codes.to(tl.int32)) * scale[:, None]


@triton.jit
def _tanh(x):
    """tanh from exp2, stable for large |x| (older triton.language has no tanh)."""
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_tile(q, m, denom, acc, k_base, v_base, table_ptr, start, kv_start, kv_end, q_pos,
                 scale_log2, cap_log2, stride_kb, stride_ks, stride_vb, stride_vs, dims, d_ok,
                 MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr,
                 SOFTCAP: tl.constexpr, lut_ptr, k_scale_base, v_scale_base,
                 QUANT: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Fold keys ``start..start+BLOCK_N`` (paged) into the running softmax state.

    Unmasked tiles lie wholly inside every row's visible range; masked tiles apply
    ``key <= q_pos``, ``kv_start <= key < kv_end`` and, with a window, ``key > q_pos -
    WINDOW``. With ``QUANT`` the pools hold quantized rows (bytes; ``kernels.kv_quant``),
    dequantized here as they are loaded.
    """
    k_pos = start + tl.arange(0, BLOCK_N)
    kv_ok = (k_pos < kv_end) & (k_pos >= kv_start)
    if MASKED:
        block = tl.load(table_ptr + k_pos // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
    else:
        block = tl.load(table_ptr + k_pos // BLOCK_SIZE).to(tl.int64)
    slot = k_pos % BLOCK_SIZE
    k_offs = (block * stride_kb + slot * stride_ks)[:, None] + dims[None, :]
    v_offs = (block * stride_vb + slot * stride_vs)[:, None] + dims[None, :]
    if MASKED:
        k = tl.load(k_base + k_offs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + v_offs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(k_base + k_offs)
        v = tl.load(v_base + v_offs)
    else:
        k = tl.load(k_base + k_offs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + v_offs, mask=d_ok[None, :], other=0.0)
    if QUANT:
        k_rows, v_rows = block * stride_kb + slot * stride_ks, block * stride_vb + slot * stride_vs
        k = _dequantize(k, lut_ptr, k_scale_base, k_rows, kv_ok, HEAD_DIM)
        v = _dequantize(v, lut_ptr, v_scale_base, v_rows, kv_ok, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if SOFTCAP:
        s = cap_log2 * _tanh(s / cap_log2)
    if MASKED:
        visible = (k_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]
        if WINDOW > 0:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, denom, acc


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale_log2,
    cap_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    SKIP_DECODE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    lut_ptr,
    k_scale_ptr,
    v_scale_ptr,
    QUANT: tl.constexpr,
    part_out_ptr,
    part_lse_ptr,
    partition,
    num_parts,
    stride_pt,
    stride_ph,
    stride_pp,
    stride_lt,
    stride_lh,
    SPLIT: tl.constexpr,
):
    """Grid ``(query tiles, seqs, kv_heads)``: a tile of new tokens over prefix + new keys.

    With ``SPLIT`` the grid is ``(query tiles, seqs, kv_heads x num_parts)``: each
    program takes ``partition`` keys of the tile's range and writes its normalized
    partial output and base-2 log-sum-exp (``-inf`` where a row saw no key) for
    ``_prefill_reduce_kernel`` to merge. A few new tokens over a long prefix then fill
    the device instead of a handful of programs walking every key.
    """
    tile, seq, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    part = 0
    if SPLIT:
        part = kvh % num_parts
        kvh = kvh // num_parts
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    if SKIP_DECODE and q_len == 1:  # the decode kernel serves these rows
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len + tile * BLOCK_Q  # context position of the tile's first row
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q, tok, head, row_ok = _load_queries(q_ptr, q_start + tile * BLOCK_Q, q_len - tile * BLOCK_Q,
                                         kvh, stride_qt, stride_qh, dims, d_ok,
                                         GROUP, GROUP_PAD, BLOCK_M)  # fmt: skip
    q_pos = first_pos + tok
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    # Quantized pools: the same rows read as float16, where each row's scale lives.
    k_scale_base = k_scale_ptr + kvh * stride_kh // 2
    v_scale_base = v_scale_ptr + kvh * stride_vh // 2
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
    if SPLIT:  # never with a window: the launcher keeps windows whole
        lo = part * partition
        hi = tl.minimum(lo + partition, kv_end)
        open_end = (first_pos + 1) // BLOCK_N * BLOCK_N
        mid = tl.maximum(lo, tl.minimum(hi, open_end))
        for start in range(lo, mid, BLOCK_N):
            m, denom, acc = _attend_tile(q, m, denom, acc, k_base, v_base, table, start, 0, hi,
                                     q_pos, scale_log2, cap_log2, stride_kb, stride_ks,
                                     stride_vb, stride_vs, dims, d_ok, False,
                                     HEAD_DIM == BLOCK_D, BLOCK_N, BLOCK_SIZE, PRECISION,
                                     0, SOFTCAP, lut_ptr, k_scale_base, v_scale_base, QUANT,
                                     HEAD_DIM)  # fmt: skip
        for start in range(mid, hi, BLOCK_N):
            m, denom, acc = _attend_tile(q, m, denom, acc, k_base, v_base, table, start, 0, hi,
                                     q_pos, scale_log2, cap_log2, stride_kb, stride_ks,
                                     stride_vb, stride_vs, dims, d_ok, True,
                                     HEAD_DIM == BLOCK_D, BLOCK_N, BLOCK_SIZE, PRECISION,
                                     0, SOFTCAP, lut_ptr, k_scale_base, v_scale_base, QUANT,
                                     HEAD_DIM)  # fmt: skip
        seen = denom > 0
        lse = tl.where(seen, m + tl.log2(tl.where(seen, denom, 1.0)), float("-inf"))
        partial = acc / tl.where(seen, denom, 1.0)[:, None]
        rows = (q_start + tile * BLOCK_Q + tok).to(tl.int64)
        lse_offs = rows * stride_lt + head * stride_lh + part
        tl.store(part_lse_ptr + lse_offs, lse, mask=row_ok)
        offs = (rows * stride_pt + head * stride_ph + part * stride_pp)[:, None] + dims[None, :]
        tl.store(part_out_ptr + offs, partial, mask=row_ok[:, None])
    else:
        if WINDOW > 0:
            # Every tile masked: rows of one tile see different windows.
            kv_start = tl.maximum(first_pos - WINDOW + 1, 0)
            open_end = kv_start // BLOCK_N * BLOCK_N
        else:
            # Keys up to first_pos are visible to every row: no causal mask there.
            kv_start = 0
            open_end = (first_pos + 1) // BLOCK_N * BLOCK_N
            for start in range(0, open_end, BLOCK_N):
                m, denom, acc = _attend_tile(q, m, denom, acc, k_base, v_base, table, start,
                                         kv_start, kv_end, q_pos, scale_log2, cap_log2,
                                         stride_kb, stride_ks, stride_vb, stride_vs, dims, d_ok,
                                         False, HEAD_DIM == BLOCK_D, BLOCK_N, BLOCK_SIZE,
                                         PRECISION, WINDOW, SOFTCAP, lut_ptr, k_scale_base,
                                         v_scale_base, QUANT, HEAD_DIM)  # fmt: skip
        for start in range(open_end, kv_end, BLOCK_N):
            m, denom, acc = _attend_tile(q, m, denom, acc, k_base, v_base, table, start, kv_start,
                                     kv_end, q_pos, scale_log2, cap_log2, stride_kb, stride_ks,
                                     stride_vb, stride_vs, dims, d_ok, True, HEAD_DIM == BLOCK_D,
                                     BLOCK_N, BLOCK_SIZE, PRECISION, WINDOW, SOFTCAP, lut_ptr,
                                     k_scale_base, v_scale_base, QUANT, HEAD_DIM)  # fmt: skip
        out = acc / denom[:, None]
        offs = (q_start + tile * BLOCK_Q + tok).to(tl.int64)[:, None] * stride_ot
        offs = offs + (head * stride_oh)[:, None] + dims[None, :]
        tl.store(
            out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
        )


@triton.jit
def _prefill_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    query_start_loc_ptr,
    num_parts,
    stride_pt,
    stride_ph,
    stride_pp,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    SKIP_DECODE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """Grid ``(query tiles, seqs, heads)``: merge a split prefill's partial outputs by
    their log-sum-exp into ``out`` (rows of one-token sequences are the decode kernel's
    with ``SKIP_DECODE``)."""
    tile, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    if SKIP_DECODE and q_len == 1:
        return
    tok = tl.arange(0, BLOCK_Q)
    row_ok = tok < q_len - tile * BLOCK_Q
    rows = (q_start + tile * BLOCK_Q + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_Q], -1.0e30, tl.float32)
    weight = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for part in range(0, num_parts):
        lse = tl.load(part_lse_ptr + rows * stride_lt + head * stride_lh + part, mask=row_ok,
                      other=float("-inf"))  # fmt: skip
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # 0 for a part whose rows saw no key
        offs = (rows * stride_pt + head * stride_ph + part * stride_pp)[:, None] + dims[None, :]
        o = tl.load(part_out_ptr + offs, mask=row_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + o * w[:, None]
        weight = weight * alpha + w
        m = m_new
    out = acc / tl.where(weight > 0, weight, 1.0)[:, None]
    dst = out_ptr + (rows * stride_ot + head * stride_oh)[:, None] + dims[None, :]
    tl.store(
        dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    )


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_out_ptr,
    part_lse_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale_log2,
    cap_log2,
    partition,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ps,
    stride_ph,
    stride_pp,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    lut_ptr,
    k_scale_ptr,
    v_scale_ptr,
    QUANT: tl.constexpr,
):
    """Grid ``(seqs, kv_heads, partitions)``: one query per head over one KV partition.

    Writes the partition's normalized output and its base-2 log-sum-exp; sequences
    whose query length is not 1 are left to the prefill kernel. Partitions split the
    keys the query sees: its last ``WINDOW`` with a window, else all.
    """
    seq, kvh, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    if q_end - tl.load(query_start_loc_ptr + seq) != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    start = part * partition
    if WINDOW > 0:
        start += tl.maximum(seq_len - WINDOW, 0)
    if start >= seq_len:
        return
    end = tl.minimum(start + partition, seq_len)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q, tok, head, row_ok = _load_queries(q_ptr, q_end - 1, 1, kvh, stride_qt, stride_qh, dims,
                                         d_ok, GROUP, GROUP_PAD, GROUP_PAD)  # fmt: skip
    q_pos = seq_len - 1 + tok
    m = tl.full([GROUP_PAD], -1.0e30, tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    # Quantized pools: the same rows read as float16, where each row's scale lives.
    k_scale_base = k_scale_ptr + kvh * stride_kh // 2
    v_scale_base = v_scale_ptr + kvh * stride_vh // 2
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    # Every key from start to end is inside the query's window: no window mask needed.
    for t0 in range(start, full_end, BLOCK_N):
        m, denom, acc = _attend_tile(q, m, denom, acc, k_base, v_base, table, t0, start, end,
                                 q_pos, scale_log2, cap_log2, stride_kb, stride_ks, stride_vb,
                                 stride_vs, dims, d_ok, False, HEAD_DIM == BLOCK_D, BLOCK_N,
                                 BLOCK_SIZE, PRECISION, 0, SOFTCAP, lut_ptr, k_scale_base,
                                 v_scale_base, QUANT, HEAD_DIM)  # fmt: skip
    if full_end < end:
        m, denom, acc = _attend_tile(q, m, denom, acc, k_base, v_base, table, full_end, start,
                                 end, q_pos, scale_log2, cap_log2, stride_kb, stride_ks,
                                 stride_vb, stride_vs, dims, d_ok, True, HEAD_DIM == BLOCK_D,
                                 BLOCK_N, BLOCK_SIZE, PRECISION, 0, SOFTCAP, lut_ptr,
                                 k_scale_base, v_scale_base, QUANT, HEAD_DIM)  # fmt: skip
    base = seq.to(tl.int64) * stride_ps + head * stride_ph + part * stride_pp
    tl.store(part_lse_ptr + base // BLOCK_D, m + tl.log2(denom), mask=row_ok)
    tl.store(part_out_ptr + base[:, None] + dims[None, :], acc / denom[:, None],
             mask=row_ok[:, None])  # fmt: skip


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    partition,
    stride_ps,
    stride_ph,
    stride_pp,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Grid ``(seqs, heads)``: merge a decode query's partitions by their log-sum-exp."""
    seq, head = tl.program_id(0), tl.program_id(1)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    if q_end - tl.load(query_start_loc_ptr + seq) != 1:
        return
    seen = tl.load(seq_lens_ptr + seq)
    if WINDOW > 0:
        seen = tl.minimum(seen, WINDOW)
    num_parts = tl.cdiv(seen, partition)
    base = seq.to(tl.int64) * stride_ps + head * stride_ph
    parts = tl.arange(0, BLOCK_P)
    dims = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        offs = (base + (p0 + parts) * stride_pp) // BLOCK_D
        lse = tl.load(part_lse_ptr + offs, mask=p0 + parts < num_parts, other=float("-inf"))
        m = tl.maximum(m, lse)
    m_all = tl.max(m, 0)
    weight_sum = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        part_ok = p0 + parts < num_parts
        offs = base + (p0 + parts) * stride_pp
        lse = tl.load(part_lse_ptr + offs // BLOCK_D, mask=part_ok, other=float("-inf"))
        w = tl.exp2(lse - m_all)
        o = tl.load(part_out_ptr + offs[:, None] + dims[None, :], mask=part_ok[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
        weight_sum += w
    out = acc / tl.sum(weight_sum, 0)
    dst = out_ptr + (q_end - 1).to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# Ground truth for whether these kernels were built for the CPU interpreter; the
# backend reloads this module when TRITON_INTERPRET changed since the import.
INTERPRETED = not isinstance(_prefill_kernel, triton.runtime.JITFunction)
