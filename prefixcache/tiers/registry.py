"""KV tiers by name: each implementation registers a factory, the engine builds the
tiers its configuration lists, in order.

    register_kv_tier("mytier", MyTier.from_context)
    Engine.from_pretrained(model, host_cache_tokens=..., kv_tiers=("mytier",))

The order is the host tier (when ``host_cache_tokens``), the disk tier (when
``disk_cache_dir``), each name in ``kv_tiers``, then the shared Redis tier (when
``kv_store``): chunks evicted from one tier move
to the next, and lookups ask them in that order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from prefixcache.tiers.base import KVTier

if TYPE_CHECKING:
    from prefixcache.config import EngineConfig

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_RESERVED = ("device",)  # the pool in front of every tier reports under this name


class TierContext(NamedTuple):
    """What a tier factory is given: the engine's config and the shape of its KV."""

    config: EngineConfig
    fingerprint: str  # names the model, dtype and weights: chunks of another never match
    block_size: int
    chunk_size: int
    block_shape: tuple[int, ...]  # (block_size, kv_heads, head_dim), one K or V block
    dtype: torch.dtype
    num_layers: int
    device: torch.device

    @property
    def blocks_per_chunk(self) -> int:
        """KV blocks in one hash chunk."""
        return self.chunk_size // self.block_size

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """``KVChunk.data`` of a whole chunk: ``(layers, 2, blocks_per_chunk, *block_shape)``."""
        return (self.num_layers, 2, self.blocks_per_chunk, *self.block_shape)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K and V over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * math.prod(self.block_shape) * itemsize


TierFactory = Callable[[TierContext], KVTier]
_FACTORIES: dict[str, TierFactory] = {}


def register_kv_tier(name: str, factory: TierFactory) -> None:
    """Make ``name`` usable in ``EngineConfig.kv_tiers``: ``factory(context)`` builds the
    tier (a ``KVTier`` whose ``name`` is ``name``) for one engine.

    Names are lowercase letters, digits, ``-`` and ``_``. Registering a name again with
    another factory is a ``ValueError``; the same factory again is a no-op.
    """
    if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
        raise ValueError(f"a KV tier name is lowercase letters, digits, '-' and '_', got {name!r}")
    if not callable(factory):
        raise ValueError(f"the factory of KV tier {name!r} must be callable, got {factory!r}")
    known = _FACTORIES.get(name)
    if known is not None and known is not factory:
        raise ValueError(f"a KV tier named {name!r} is registered already")
    _FACTORIES[name] = factory


def registered_kv_tiers() -> tuple[str, ...]:
    """Names registered so far, in registration order."""
    return tuple(_FACTORIES)


def tier_names(config: EngineConfig) -> tuple[str, ...]:
    """The tiers ``config`` asks for, in order; ``ValueError`` on an unknown or repeated name."""
    names = ["host"] if config.host_cache_tokens else []
    names += ["disk"] if config.disk_cache_dir else []
    for name in config.kv_tiers:
        if name not in _FACTORIES:
            known = ", ".join(registered_kv_tiers()) or "none"
            raise ValueError(f"kv_tiers names an unknown tier {name!r}; registered: {known}")
        if name in names:
            raise ValueError(
                f"kv_tiers lists tier {name!r} twice (host and disk are added by "
                "host_cache_tokens and disk_cache_dir)"
            )
        names.append(name)
    if config.kv_store:
        if "redis" in names:
            raise ValueError("kv_tiers lists 'redis', which kv_store adds already")
        names.append("redis")
    return tuple(names)


def make_kv_tier(name: str, context: TierContext) -> KVTier:
    """Build the registered tier ``name`` for ``context``."""
    tier = _FACTORIES[name](context)
    if not isinstance(tier, KVTier) or tier.name != name:
        raise TypeError(f"the factory of KV tier {name!r} returned {tier!r}, not a KVTier so named")
    return tier
