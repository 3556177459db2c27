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

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Write layer ``layer``'s new K/V and attend over the paged context (its last
        ``sliding_window`` keys per query where the layer has a window)."""
        k_cache, v_cache = self.kv_caches[layer]
        return self.backend.forward(
            q, k, v, k_cache, v_cache, self.meta, scale,
            sliding_window=sliding_window, softcap=softcap,
        )  # fmt: skip
