"""Model architectures; importing this package registers all of them."""

from prefixcache.models import gemma, llama, qwen2, qwen3  # noqa: F401  (registration)
from prefixcache.models.registry import register_model, resolve_model, supported_architectures

__all__ = ["register_model", "resolve_model", "supported_architectures"]
