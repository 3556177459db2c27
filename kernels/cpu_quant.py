"""The C decode kernel for quantized (int8/fp8) KV pools, loaded like ``kernels.cpu_native``.

``kernels/csrc/paged_decode_quant.c`` converts codes to floats inside its dot products
and applies each row's scale there, so it reads a quarter of the float32 kernel's
bytes and never makes a full-precision copy of the context. Optional like its float32
sibling: without a compiler or with ``PREFIXCACHE_NATIVE_KERNELS=0`` callers get None
and use torch ops.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels.cpu_native import data_pointer, load_library

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode_quant.c"
_F32, _I32 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
_U8 = ctypes.POINTER(ctypes.c_uint8)
_FP8_FLAG = {torch.int8: 0, torch.float8_e4m3fn: 1}


@functools.cache
def paged_decode_quant_window():
    """The C ``paged_decode_quant_window`` function (sliding window, score cap), or None."""
    library = load_library(_SOURCE)
    if library is None:
        return None
    function = library.paged_decode_quant_window
    function.restype = ctypes.c_int
    function.argtypes = [_F32, _U8, _U8, _I32, _I32, _F32] + [ctypes.c_int] * 6
    function.argtypes += [ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    return function


def decode_attention_quant(
    query,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
):
    """Attention of one new token per sequence over its quantized paged context.

    ``query`` [seqs, heads, dim] float32; caches [blocks, block_size, kv_heads, dim + 2]
    of int8 or float8_e4m3fn rows (``kernels.kv_quant``), contiguous; ``block_tables``
    [seqs, max_blocks] and ``seq_lens`` [seqs] int32. ``sliding_window`` and ``softcap``
    as in ``kernels.cpu_native.decode_attention``. Returns None when the kernel is
    unavailable or cannot take these shapes.
    """
    function = paged_decode_quant_window()
    if function is None or k_cache.dtype not in _FP8_FLAG:
        return None
    query = query.contiguous()
    tables, lens = block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(query)
    num_seqs, heads, dim = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    status = function(
        data_pointer(query, _F32),
        data_pointer(k_cache, _U8),
        data_pointer(v_cache, _U8),
        data_pointer(tables, _I32),
        data_pointer(lens, _I32),
        data_pointer(out, _F32),
        num_seqs,
        heads,
        kv_heads,
        dim,
        block_size,
        tables.shape[1],
        scale,
        sliding_window or 0,
        softcap or 0.0,
        _FP8_FLAG[k_cache.dtype],
        torch.get_num_threads(),
    )
    return out if status == 0 else None
