"""Attention backends over paged KV pools, chosen by name through a registry."""

# Importing a backend module registers it. "flash-attn" and "triton" register without
# importing their packages; ``is_available`` says whether those packages (and a device
# to run them on) are present, so nothing here fails where they are absent.
from kernels import flash_attn_backend as _flash_attn_backend  # noqa: F401
from kernels import torch_ref as _torch_ref  # noqa: F401
from kernels import triton_backend as _triton_backend  # noqa: F401
from kernels.backend import AttentionBackend, available_backends, get_backend, register_backend
from kernels.metadata import AttentionMetadata

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_backend",
    "register_backend",
]
