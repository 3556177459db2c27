"""The one object a forward pass needs besides token ids and positions."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Layers whose pools have block ids of their own (a hybrid KV cache's window layers).
    layer_meta: dict[int, AttentionMetadata] = field(default_factory=dict)
    # Rotary cos/sin of this step's positions, made once and shared by every layer
    # (``models.fused.rope_tables``).
    rope_tables: dict[object, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

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
        meta = self.layer_meta.get(layer, self.meta)
        return self.backend.forward(
            q, k, v, k_cache, v_cache, meta, scale,
            sliding_window=sliding_window, softcap=softcap,
        )  # fmt: skip
