"""The one object a forward pass needs besides token ids and positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import AttentionBackend, AttentionMetadata


@dataclass(slots=True)
class ForwardContext:
    """Per-step attention metadata, the paged KV pools, and the backend that reads them."""

    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    backend: AttentionBackend
    # Per token: run LongRoPE's long factors at every position (``models.rope``); None
    # when no sequence of the step does.
    long_rope: torch.Tensor | None = None

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Write layer ``layer``'s new K/V and attend over the paged context."""
        k_cache, v_cache = self.kv_caches[layer]
        return self.backend.forward(q, k, v, k_cache, v_cache, self.meta, scale)
