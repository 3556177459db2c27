"""The "triton" attention backend: paged KV write, prefill over a prefix, split-K decode.

Triton is imported lazily (through ``kernels.triton_attention``), so this module
registers the backend on machines without triton; ``is_available`` then says no.
On CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple

import torch

from kernels.backend import AttentionBackend, check_window, register_backend
from kernels.kv_quant import code_values, is_quantized, write_quantized
from kernels.metadata import AttentionMetadata

LOG2E = 1.4426950408889634
_KERNEL_MODULE = "kernels.triton_attention"
# Decode splits are at least this long, so the reduction stays a small share of the work.
MIN_PARTITION = 256
# A split prefill's parts are at least this many keys.
MIN_PREFILL_PARTITION = 2048
# Decode programs per streaming multiprocessor to aim for (flash-decoding's occupancy goal).
PROGRAMS_PER_SM = 8


class PrefillTiles(NamedTuple):
    """Launch shape of the prefill kernel."""

    block_m: int = 128  # tile rows: new tokens x (padded) query heads of one KV head
    block_n: int = 64  # keys per inner step
    num_warps: int = 8
    num_stages: int = 3
    # Keys per split when few query tiles meet a long context (a multiple of block_n);
    # 0 splits on CUDA only when the tiles alone would not fill the device.
    partition: int = 0


class DecodeTiles(NamedTuple):
    """Launch shape of the split-K decode kernels."""

    block_n: int = 64  # keys per inner step
    partition: int = 0  # keys per split (a multiple of block_n); 0 sizes it to fill the device
    num_warps: int = 4
    num_stages: int = 3
    block_p: int = 32  # partitions merged per step of the reduction


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def default_prefill_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillTiles:
    """Tiles for the prefill kernel on ``device``: big tiles make the interpreter fast too."""
    if device.type != "cuda":
        return PrefillTiles(block_m=64, block_n=64)
    if dtype == torch.float32:  # 4-byte tiles: fewer pipeline stages fit in shared memory
        return PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return PrefillTiles(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:  # 4 warps: 1.2x 8 on an H200 (bench/gpu_check.py's tile sweep)
        return PrefillTiles(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return PrefillTiles(block_m=64, block_n=32, num_warps=8, num_stages=2)


def default_decode_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> DecodeTiles:
    """Tiles for the decode kernels on ``device``."""
    if device.type != "cuda":
        return DecodeTiles(block_n=64)
    if dtype == torch.float32 or head_dim > 128:
        return DecodeTiles(block_n=32, num_stages=2)
    return DecodeTiles()


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
) -> None:
    """Store ``key``/``value`` ``[tokens, kv_heads, d]`` at their slots (slot -1: skipped)."""
    tokens, kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _check_pools(k_cache, v_cache)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("K and V pools must share one memory layout")
    block_h, block_d = _pow2(kv_heads), _pow2(head_dim)
    block_t = 64 if k_cache.device.type != "cuda" else max(1, 4096 // (block_h * block_d))
    grid = (_cdiv(tokens, block_t),)
    _kernels()._write_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping, tokens,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3],
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
    )  # fmt: skip


def prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    tiles: PrefillTiles,
    skip_decode: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Causal attention of each sequence's new queries over its prefix and new keys.

    Writes ``out`` rows; with ``skip_decode`` rows of one-token sequences are left alone.
    ``sliding_window`` and ``softcap`` are as in ``AttentionBackend.attend``.
    """
    heads, head_dim = query.shape[1:]
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    group_pad = _pow2(group)
    block_m = max(tiles.block_m, group_pad, 16)
    block_q = block_m // group_pad  # new tokens per tile
    tiles_per_seq = _cdiv(max(meta.query_lens_cpu), block_q)
    grid = (tiles_per_seq, meta.num_seqs, kv_heads)
    parts, partition = 1, 0
    if sliding_window is None:
        partition = _prefill_partition(meta, grid, tiles, query.device)
        parts = _cdiv(max(meta.seq_lens_cpu), partition) if partition else 1
    k_pool, v_pool, quant = _quant_args(k_cache, v_cache)
    split = _split_args(query, out, parts, partition, _block_d(head_dim))
    _kernels()._prefill_kernel[(grid[0], grid[1], grid[2] * parts)](
        query, k_pool, v_pool, out,
        meta.block_tables, meta.query_start_loc, meta.seq_lens, scale * LOG2E,
        (softcap or 1.0) * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], meta.block_tables.stride(0),
        SKIP_DECODE=skip_decode, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=tiles.block_n,
        BLOCK_SIZE=meta.block_size, PRECISION=_precision(query.dtype),
        WINDOW=sliding_window or 0, SOFTCAP=softcap is not None, **quant, **split,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if parts > 1:
        part_out, part_lse = split["part_out_ptr"], split["part_lse_ptr"]
        _kernels()._prefill_reduce_kernel[(tiles_per_seq, meta.num_seqs, heads)](
            part_out, part_lse, out, meta.query_start_loc, parts,
            *part_out.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1),
            SKIP_DECODE=skip_decode, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
            BLOCK_Q=block_q, num_warps=4,
        )  # fmt: skip


def _prefill_partition(meta: AttentionMetadata, grid, tiles: PrefillTiles, device) -> int:
    """Keys per split of a prefill, or 0 for none: on CUDA a split only pays when the
    query tiles leave most of the device idle while each walks a long context."""
    if tiles.partition:
        return _asked_partition("prefill", tiles)
    if device.type != "cuda":
        return 0
    programs, longest = grid[0] * grid[1] * grid[2], max(meta.seq_lens_cpu)
    splits = min(_cdiv(2 * _sm_count(device), programs), longest // MIN_PREFILL_PARTITION)
    if splits < 2:
        return 0
    return _cdiv(_cdiv(longest, splits), tiles.block_n) * tiles.block_n


def _split_args(query: torch.Tensor, out: torch.Tensor, parts: int, partition: int,
                block_d: int) -> dict:  # fmt: skip
    """The split prefill's scratch (partial outputs and log-sum-exps per row, head and
    part) and its strides; placeholders when the prefill is not split."""
    if parts == 1:
        unused = {"part_out_ptr": out, "part_lse_ptr": out, "partition": 0, "num_parts": 1}
        strides = dict.fromkeys(
            ("stride_pt", "stride_ph", "stride_pp", "stride_lt", "stride_lh"), 0
        )
        return {**unused, **strides, "SPLIT": False}
    tokens, heads = query.shape[:2]
    part_out = query.new_empty((tokens, heads, parts, block_d), dtype=torch.float32)
    part_lse = query.new_empty((tokens, heads, parts), dtype=torch.float32)
    return {
        "part_out_ptr": part_out, "part_lse_ptr": part_lse, "partition": partition,
        "num_parts": parts, "stride_pt": part_out.stride(0), "stride_ph": part_out.stride(1),
        "stride_pp": part_out.stride(2), "stride_lt": part_lse.stride(0),
        "stride_lh": part_lse.stride(1), "SPLIT": True,
    }  # fmt: skip


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    tiles: DecodeTiles,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Flash-decoding for the one-token sequences of the step; writes their ``out`` rows.

    Each (sequence, KV head) is split into partitions of the keys its query sees (the
    last ``sliding_window`` with a window) that run in parallel; a second kernel merges
    them by log-sum-exp.
    """
    heads, head_dim = query.shape[1:]
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    lens = [s for n, s in zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True) if n == 1]
    if sliding_window is not None:
        lens = [min(s, sliding_window) for s in lens]
    partition = _decode_partition(lens, kv_heads, tiles, query.device)
    num_parts, block_d = _cdiv(max(lens), partition), _block_d(head_dim)
    # Partial results; the log-sum-exp uses the same layout without the last dimension.
    part_out = query.new_empty((meta.num_seqs, heads, num_parts, block_d), dtype=torch.float32)
    part_lse = query.new_empty((meta.num_seqs, heads, num_parts), dtype=torch.float32)
    kernels = _kernels()
    k_pool, v_pool, quant = _quant_args(k_cache, v_cache)
    kernels._decode_partial_kernel[(meta.num_seqs, kv_heads, num_parts)](
        query, k_pool, v_pool, part_out, part_lse,
        meta.block_tables, meta.query_start_loc, meta.seq_lens, scale * LOG2E,
        (softcap or 1.0) * LOG2E, partition,
        query.stride(0), query.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        meta.block_tables.stride(0), *part_out.stride()[:3],
        GROUP=group, GROUP_PAD=max(_pow2(group), 16), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=tiles.block_n, BLOCK_SIZE=meta.block_size, PRECISION=_precision(query.dtype),
        WINDOW=sliding_window or 0, SOFTCAP=softcap is not None,
        **quant, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    kernels._decode_reduce_kernel[(meta.num_seqs, heads)](
        part_out, part_lse, out, meta.query_start_loc, meta.seq_lens, partition,
        *part_out.stride()[:3], out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=tiles.block_p,
        WINDOW=sliding_window or 0, num_warps=4,
    )  # fmt: skip


@register_backend("triton")
class TritonBackend(AttentionBackend):
    """Paged attention in Triton kernels; the default on CUDA when flash-attn is absent.

    ``prefill_tiles``/``decode_tiles`` override the per-device launch shapes (tests
    use small tiles to cross many tile and split boundaries).
    """

    def __init__(
        self, prefill_tiles: PrefillTiles | None = None, decode_tiles: DecodeTiles | None = None
    ) -> None:
        self.prefill_tiles = prefill_tiles
        self.decode_tiles = decode_tiles

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        """On CUDA with triton installed; on CPU only under ``TRITON_INTERPRET=1``."""
        device = torch.device(device)
        if not triton_importable():
            return False
        if device.type == "cuda":
            return torch.cuda.is_available()
        return device.type == "cpu" and interpreter_enabled()

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        """One launch stores all the step's new K/V rows of this layer; int8/fp8 pools
        get their rows quantized by torch ops (``kernels.kv_quant``)."""
        if is_quantized(k_cache):
            write_quantized(key, value, k_cache, v_cache, meta.slot_mapping)
            return
        write_kv(key, value, k_cache, v_cache, meta.slot_mapping, meta.block_size)

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
        """Decode rows go to the split-K kernels, all other rows to the prefill kernel."""
        check_window(sliding_window, softcap)
        limits = {"sliding_window": sliding_window, "softcap": softcap}
        query = _last_dim_contiguous(query)
        _check_pools(k_cache, v_cache)
        if query.device.type != "cuda" and query.dtype == torch.bfloat16:
            # The interpreter multiplies tiles with numpy, which has no bfloat16.
            raise ValueError(
                "the triton backend cannot run bfloat16 under Triton's CPU interpreter; "
                "use float32 or float16 on CPU"
            )
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        head_dim, dtype, device = query.shape[2], query.dtype, query.device
        decodes = sum(1 for n in meta.query_lens_cpu if n == 1)
        if decodes:
            tiles = self.decode_tiles or default_decode_tiles(head_dim, dtype, device)
            decode_attention(query, k_cache, v_cache, out, meta, scale, tiles, **limits)
        if decodes < meta.num_seqs:
            tiles = self.prefill_tiles or default_prefill_tiles(head_dim, dtype, device)
            prefill_attention(
                query, k_cache, v_cache, out, meta, scale, tiles, decodes > 0, **limits
            )
        return out


def _kernels() -> ModuleType:
    """The kernel module, built for the interpreter exactly when TRITON_INTERPRET says so.

    ``triton.jit`` picks compiled or interpreted functions when a module is imported,
    so a change of the setting since then rebuilds the kernels here. (Triton's own
    ``tl`` helpers are fixed when triton is first imported: interpreting needs
    TRITON_INTERPRET set before that.)
    """
    module = importlib.import_module(_KERNEL_MODULE)
    if interpreter_enabled() != module.INTERPRETED:
        module = importlib.reload(module)
    return module


def _quant_args(k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The pools as the kernels read them, and the kernels' quantization arguments.

    Quantized pools go in as bytes, with float16 views of the same memory for the
    scales and the 256-entry table of code values; plain pools stand in for the unused
    pointers.
    """
    if not is_quantized(k_cache):
        unused = {"lut_ptr": k_cache, "k_scale_ptr": k_cache, "v_scale_ptr": v_cache}
        return k_cache, v_cache, {**unused, "QUANT": False}
    k_bytes, v_bytes = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    quant = {
        "lut_ptr": code_values(k_cache.dtype, k_cache.device),
        "k_scale_ptr": k_bytes.view(torch.float16),
        "v_scale_ptr": v_bytes.view(torch.float16),
        "QUANT": True,
    }
    return k_bytes, v_bytes, quant


def _decode_partition(lens: list[int], kv_heads: int, tiles: DecodeTiles, device) -> int:
    """Keys per split: seqs x kv_heads x splits fills the GPU; one split on CPU."""
    if tiles.partition:
        return _asked_partition("decode", tiles)
    if device.type != "cuda":
        return _cdiv(max(lens), tiles.block_n) * tiles.block_n
    programs = _sm_count(device) * PROGRAMS_PER_SM
    splits = max(1, _cdiv(programs, len(lens) * kv_heads))
    size = _cdiv(_cdiv(max(lens), splits), tiles.block_n) * tiles.block_n
    return max(size, _cdiv(MIN_PARTITION, tiles.block_n) * tiles.block_n)


def _asked_partition(kind: str, tiles: PrefillTiles | DecodeTiles) -> int:
    """The keys per split the tiles fix; a ``ValueError`` unless a multiple of block_n."""
    if tiles.partition % tiles.block_n:
        raise ValueError(
            f"{kind} partition {tiles.partition} is not a multiple of block_n {tiles.block_n}"
        )
    return tiles.partition


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_of(index)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_pools(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV pools need a contiguous last (head_dim) dimension")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"K and V pools differ in shape: {k_cache.shape} vs {v_cache.shape}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str | None:
    # float32 inputs must not silently drop to TF32 on tensor cores; others use the default.
    return "ieee" if dtype == torch.float32 else None


def _block_d(head_dim: int) -> int:
    return max(16, _pow2(head_dim))  # tl.dot needs every dimension >= 16


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
