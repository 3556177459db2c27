"""Attention backends over paged KV pools, chosen by name through a registry."""

from kernels import torch_ref as _torch_ref  # noqa: F401  (registers "torch")
from kernels.backend import AttentionBackend, available_backends, get_backend, register_backend
from kernels.metadata import AttentionMetadata

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_backend",
    "register_backend",
]
