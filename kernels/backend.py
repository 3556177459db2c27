"""The attention backend interface and its registry.

The model code calls ``backend.forward`` and never asks which backend runs. Adding a
backend means one new module that subclasses ``AttentionBackend`` and decorates it
with ``register_backend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from kernels.metadata import AttentionMetadata

_REGISTRY: dict[str, type[AttentionBackend]] = {}


class AttentionBackend(ABC):
    """Paged attention over per-layer KV pools of shape ``[blocks, block_size, kv_heads, d]``."""

    name: str = ""

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        """Whether this backend can run on ``device`` in this process."""
        return True

    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Store the step's new K/V (``[tokens, kv_heads, d]``) at ``meta.slot_mapping``."""

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of the new queries ``[tokens, heads, d]`` over their contexts.

        ``sliding_window`` W limits each query at position p to keys ``p-W+1..p`` (the
        Hugging Face convention: W keys, its own included; None: the whole context).
        Keys before the window may live in freed blocks: a backend never reads them.
        ``softcap`` c caps every scaled score s to ``c * tanh(s / c)`` (Gemma 2).
        """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Write this step's K/V into the pools, then attend; returns ``[tokens, heads, d]``."""
        self.write_kv(key, value, k_cache, v_cache, meta)
        return self.attend(
            query, k_cache, v_cache, meta, scale, sliding_window=sliding_window, softcap=softcap
        )


def check_window(sliding_window: int | None, softcap: float | None) -> None:
    """Refuse a window below one key or a cap that is not positive."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    """Class decorator adding a backend to the registry under ``name``."""

    def decorate(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_backends() -> list[str]:
    """Names of all registered backends."""
    return sorted(_REGISTRY)


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """Instantiate backend ``name`` (``auto`` picks the best one for ``device``)."""
    device = torch.device(device)
    if name == "auto":
        name = _auto_choice(device)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of auto, "
            + ", ".join(available_backends())
        )
    cls = _REGISTRY[name]
    if not cls.is_available(device):
        raise ValueError(f"attention backend {name!r} is not available on device {device}")
    return cls()


def _auto_choice(device: torch.device) -> str:
    if device.type != "cuda":  # Triton on CPU means its interpreter: for tests only
        return "torch"
    for name in ("flash-attn", "triton"):
        cls = _REGISTRY.get(name)
        if cls is not None and cls.is_available(device):
            return name
    return "torch"
