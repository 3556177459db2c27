"""The "flash-attn" backend: FlashAttention-2's paged kernels, when the package is installed.

Never required: ``flash_attn`` is imported on first use only, and ``is_available`` is
false without it or without CUDA. FlashAttention-2 reads paged KV only in fp16/bf16
and only for blocks of a multiple of 256 tokens; other steps (the default block size
is 16) run on the Triton kernels, or the torch reference where triton is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType

import torch

from kernels.backend import AttentionBackend, check_window, register_backend
from kernels.kv_quant import is_quantized
from kernels.metadata import AttentionMetadata
from kernels.torch_ref import TorchReferenceBackend
from kernels.triton_backend import TritonBackend

logger = logging.getLogger(__name__)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_PAGE_MULTIPLE = 256  # flash-attn 2 refuses paged KV blocks of other sizes


@register_backend("flash-attn")
class FlashAttnBackend(AttentionBackend):
    """``flash_attn_varlen_func`` for prefill, ``flash_attn_with_kvcache`` for decode.

    Both read the pools in place through ``block_table``; the prefill's causal mask
    is aligned to the end of each context, so new tokens see their whole prefix.
    """

    def __init__(self) -> None:
        self._fallback: AttentionBackend | None = None
        self._warned = False

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        """On CUDA with the ``flash_attn`` package installed."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        return importlib.util.find_spec("flash_attn") is not None

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        """flash-attn has no standalone paged write; the fallback's kernel stores K/V."""
        self._fallback_for(k_cache.device).write_kv(key, value, k_cache, v_cache, meta)

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
        """Paged flash attention, or the fallback where flash-attn cannot read the pools
        (int8/fp8 pools with scales among them).

        A sliding window W is flash-attn's ``window_size=(W - 1, 0)``: W keys, the
        query's own included; a score cap is its ``softcap`` (0 means none there).
        """
        check_window(sliding_window, softcap)
        if is_quantized(k_cache) or not self._supports(query, meta):
            return self._fallback_for(query.device).attend(
                query, k_cache, v_cache, meta, scale, sliding_window=sliding_window,
                softcap=softcap,
            )  # fmt: skip
        flash = _flash_attn()
        query = query.contiguous()
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        extra = {"window_size": window, "softcap": softcap or 0.0}
        if meta.is_decode_only:
            out = flash.flash_attn_with_kvcache(
                query.unsqueeze(1), k_cache, v_cache,
                cache_seqlens=meta.seq_lens, block_table=meta.block_tables,
                softmax_scale=scale, causal=True, **extra,
            )  # fmt: skip
            return out.squeeze(1)
        cu_seqlens_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash.flash_attn_varlen_func(
            query, k_cache, v_cache,
            cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max(meta.query_lens_cpu), max_seqlen_k=max(meta.seq_lens_cpu),
            softmax_scale=scale, causal=True, block_table=meta.block_tables, **extra,
        )  # fmt: skip

    def _supports(self, query: torch.Tensor, meta: AttentionMetadata) -> bool:
        head_dim = query.shape[-1]
        ok = (
            query.dtype in FLASH_DTYPES
            and meta.block_size % FLASH_PAGE_MULTIPLE == 0
            and head_dim % 8 == 0
            and head_dim <= 256
        )
        if not ok and not self._warned:
            self._warned = True
            logger.warning(
                "flash-attn cannot read these pools (dtype %s, block_size %d, head_dim %d; it "
                "needs fp16/bf16 and blocks of a multiple of %d); using %s attention instead",
                query.dtype, meta.block_size, head_dim, FLASH_PAGE_MULTIPLE,
                self._fallback_for(query.device).name,
            )  # fmt: skip
        return ok

    def _fallback_for(self, device: torch.device) -> AttentionBackend:
        if self._fallback is None:
            triton_ok = TritonBackend.is_available(device)
            self._fallback = TritonBackend() if triton_ok else TorchReferenceBackend()
        return self._fallback


def _flash_attn() -> ModuleType:
    return importlib.import_module("flash_attn")
