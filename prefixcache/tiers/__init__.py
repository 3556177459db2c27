"""Everything behind the device pool: the ``KVTier`` protocol, its host-memory and disk
implementations, and the tiered cache that moves chunks between them.

A new tier is one module with a class implementing ``KVTier`` and one line
``register_kv_tier("name", factory)``; engines use it with ``kv_tiers=("name",)``.
The shared Redis tier is added by ``kv_store``.
"""

from prefixcache.tiers import disk, host, redis  # noqa: F401  (each registers its tier)
from prefixcache.tiers.base import ChunkQuery, KVChunk, KVTier, chunk_key
from prefixcache.tiers.registry import TierContext, register_kv_tier, registered_kv_tiers
from prefixcache.tiers.stats import TierStats

__all__ = [
    "ChunkQuery",
    "KVChunk",
    "KVTier",
    "TierContext",
    "TierStats",
    "chunk_key",
    "register_kv_tier",
    "registered_kv_tiers",
]
