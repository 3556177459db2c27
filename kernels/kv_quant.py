"""Quantized KV rows: one byte per element plus a float16 scale per token and KV head.

A quantized pool keeps the paged layout ``[num_blocks, block_size, kv_heads, row]``
with ``row = head_dim + SCALE_BYTES``: each (token, KV head) row holds ``head_dim``
one-byte codes, then the little-endian float16 scale they are multiplied by. The
pool's dtype names the codes (``torch.int8`` or ``torch.float8_e4m3fn``); the scale
bytes ride along as two more elements of that dtype. So a block, a tier chunk or a
disk file carries its codes and scales as one tensor of one dtype: every tier moves
it as it is, and nothing is re-quantized on the way.

Scales are computed when a token's K/V are written, from that row alone (its absolute
maximum), so a cached block never changes once written and a prefix cache hit reads
exactly the bytes a miss would have written.

- ``int8``: ``code = round(x / s)``, ``s = amax / 127``; error at most ``s / 2``.
- ``fp8`` (e4m3, no infinities, largest 448): ``code = e4m3(x / s)``, ``s = amax /
  448``; relative error at most 2^-4, plus ``s * 2^-10`` near zero (subnormals).
"""

from __future__ import annotations

import functools

import torch

SCALE_BYTES = 2  # one float16 scale after each row's codes
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
KV_CACHE_DTYPES = ("auto", *CODE_DTYPES)
"""``auto`` stores KV at the model's dtype; the others store quantized rows."""
_CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# float16's smallest subnormal and largest finite value bound the stored scale.
_SCALE_MIN, _SCALE_MAX = 2.0**-24, 65504.0


def check_kv_cache_dtype(name: str) -> None:
    """``ValueError`` unless ``name`` is one of ``KV_CACHE_DTYPES``."""
    if name not in KV_CACHE_DTYPES:
        names = ", ".join(KV_CACHE_DTYPES)
        raise ValueError(f"kv_cache_dtype must be one of {names}, got {name!r}")


def code_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The torch dtype of a quantized pool's codes; None for ``auto`` (not quantized)."""
    check_kv_cache_dtype(kv_cache_dtype)
    return CODE_DTYPES.get(kv_cache_dtype)


def is_quantized(pool: torch.Tensor) -> bool:
    """True if ``pool`` holds quantized rows (codes + scale) rather than plain values."""
    return pool.dtype in _CODE_MAX


def kv_format(pool_dtype: torch.dtype) -> str:
    """The ``kv_cache_dtype`` name a pool of ``pool_dtype`` stores (``auto`` if plain)."""
    for name, dtype in CODE_DTYPES.items():
        if dtype == pool_dtype:
            return name
    return "auto"


def row_width(head_dim: int, kv_cache_dtype: str) -> int:
    """Elements per (token, KV head) row of a pool: the head dim, plus the scale if
    quantized (which needs an even head dim, so the float16 scale is 2-byte aligned)."""
    if code_dtype(kv_cache_dtype) is None:
        return head_dim
    if head_dim % 2:
        raise ValueError(f"a quantized KV cache needs an even head_dim, got {head_dim}")
    return head_dim + SCALE_BYTES


def row_bytes(head_dim: int, kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
    """Bytes of one (token, KV head) row of K or V, scale included."""
    dtype = code_dtype(kv_cache_dtype) or model_dtype
    return row_width(head_dim, kv_cache_dtype) * torch.empty((), dtype=dtype).element_size()


def quantize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[..., head_dim]`` as quantized rows ``[..., head_dim + 2]`` of ``dtype``."""
    limit = _CODE_MAX[dtype]
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = (amax / limit).clamp(_SCALE_MIN, _SCALE_MAX).to(torch.float16)
    # Round the scale up, not to nearest, so the largest element never clips (small
    # rows' scales are float16 subnormals, far coarser than their 11-bit mantissa).
    low = scale.float() * limit < amax
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, _SCALE_MAX)), scale)
    # Codes are computed against the stored (rounded) scale, so the error bound holds.
    scaled = (x / scale.float()).clamp(-limit, limit)
    codes = scaled.round().to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    head_dim = x.shape[-1]
    out = torch.empty((*x.shape[:-1], head_dim + SCALE_BYTES), dtype=torch.uint8, device=x.device)
    out[..., :head_dim] = codes.view(torch.uint8)
    out[..., head_dim:] = scale.view(torch.uint8)
    return out.view(dtype)


def dequantize(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Quantized rows ``[..., head_dim + 2]`` (any leading strides) as ``[..., head_dim]``."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    raw = rows.view(torch.uint8)
    codes = raw[..., :head_dim].view(rows.dtype)
    scale = raw[..., head_dim:].view(torch.float16)
    return (codes.float() * scale.float()).to(dtype)


def scales(rows: torch.Tensor) -> torch.Tensor:
    """The float32 scale of each quantized row: ``[...]`` for rows ``[..., head_dim + 2]``."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    return rows.view(torch.uint8)[..., head_dim:].view(torch.float16)[..., 0].float()


@functools.cache
def code_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The float32 value of every one-byte code of ``dtype``, indexed by the code's bits
    (kernels that load codes as bytes look their values up here)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float().to(device)


def write_quantized(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Quantize new K/V ``[tokens, kv_heads, head_dim]`` into their pool slots.

    The copy goes through byte views: torch has no ``index_copy_`` for float8.
    """
    for new, pool in ((key, k_cache), (value, v_cache)):
        rows = quantize(new, pool.dtype).view(torch.uint8)
        flat = pool.view(torch.uint8).view(-1, *pool.shape[2:])
        flat.index_copy_(0, slot_mapping, rows)
