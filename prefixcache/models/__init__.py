"""Model architectures; importing this package registers all of them."""

from prefixcache.models import (  # noqa: F401  (registration)
    gemma,
    llama,
    moe_models,
    phi3,
    qwen2,
    qwen3,
)
from prefixcache.models.registry import register_model, resolve_model, supported_architectures

__all__ = ["register_model", "resolve_model", "supported_architectures"]
