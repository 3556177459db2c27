"""The C prefill kernel (``kernels/csrc/paged_prefill.c``): a step's new tokens over
their whole paged contexts, cached prefix and new keys together, in one call.

Built and loaded like the decode kernel (``kernels.cpu_native``); float32 on CPU only.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels.cpu_native import data_pointer, load_library

_SOURCE = Path(__file__).parent / "csrc" / "paged_prefill.c"
_F32, _I32 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)


@functools.cache
def paged_prefill():
    """The C ``paged_prefill_f32`` function, or None when native kernels are unavailable."""
    library = load_library(_SOURCE)
    if library is None:
        return None
    function = library.paged_prefill_f32
    function.restype = ctypes.c_int
    function.argtypes = [_F32, _F32, _F32, _I32, _I32, _I32, _F32] + [ctypes.c_int] * 6
    function.argtypes += [ctypes.c_float, ctypes.c_int]
    return function


def prefill_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """Causal attention of each sequence's new tokens over its paged context, in float32.

    ``query`` [tokens, heads, dim], sequence ``i`` owning rows
    ``query_start_loc[i]:query_start_loc[i + 1]``, the last of its ``seq_lens[i]``
    positions, whose K/V are already in the caches [blocks, block_size, kv_heads, dim]
    through ``block_tables`` [seqs, max_blocks]. Returns None when the kernel is
    unavailable or cannot take these shapes (head dim not a multiple of 16, over 256).
    """
    function = paged_prefill()
    tensors = (query, k_cache, v_cache)
    if function is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    query = query.contiguous()
    tables, lens, starts = (
        t.to(torch.int32).contiguous() for t in (block_tables, seq_lens, query_start_loc)
    )
    out = torch.empty_like(query)
    _, heads, dim = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    status = function(
        *(data_pointer(t, _F32) for t in (query, k_cache, v_cache)),
        *(data_pointer(t, _I32) for t in (tables, lens, starts)),
        data_pointer(out, _F32),
        len(lens), heads, kv_heads, dim, block_size, tables.shape[1], scale,
        torch.get_num_threads(),
    )  # fmt: skip
    return out if status == 0 else None
