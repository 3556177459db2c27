"""One snapshot of an engine's state: what ``stats()``, ``/v1/cache`` and ``/metrics`` show."""

from __future__ import annotations

from dataclasses import dataclass

from prefixcache.tiers.stats import TierStats


@dataclass(frozen=True, slots=True)
class DeviceBlocks:
    """Where the device pool's blocks are: free, or cached (evictable or locked)."""

    total: int
    free: int
    cached: int
    evictable: int
    locked: int


@dataclass(frozen=True, slots=True)
class PinStats:
    """Pins held and the cap on the tokens they may hold."""

    count: int
    pinned_tokens: int
    max_pinned_tokens: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters and sizes of one engine at one moment, read on its loop thread.

    ``tiers`` lists the device first, then every tier behind it in lookup order; each
    is the same typed ``TierStats``, so nothing downstream knows a tier by name.
    """

    prefix_caching: bool
    block_size: int
    device: DeviceBlocks
    tiers: tuple[TierStats, ...]
    query_tokens: int
    pins: PinStats
    running: int
    waiting: int
    offloaded_bytes: int = 0
    onloaded_bytes: int = 0
    kv_bytes_per_token: int = 0  # device KV bytes per cached token, scales included

    @property
    def hit_tokens(self) -> int:
        """Prompt tokens the device prefix cache served (tiers count theirs separately)."""
        return self.tiers[0].hit_tokens

    def flat(self) -> dict[str, int]:
        """A flat dict of counters (``Engine.stats()``): the device's under plain names,
        every other tier's as ``{tier}_{field}``."""
        device, blocks = self.tiers[0], self.device
        result = {
            "num_blocks": blocks.total,
            "free_blocks": blocks.free,
            "cached_blocks": blocks.cached,
            "evictable_blocks": blocks.evictable,
            "locked_blocks": blocks.locked,
            "running": self.running,
            "waiting": self.waiting,
            "query_tokens": self.query_tokens,
            "hit_tokens": device.hit_tokens,
            "evicted_blocks": device.evicted_blocks,
            "offloaded_bytes": self.offloaded_bytes,
            "onloaded_bytes": self.onloaded_bytes,
            "pinned_tokens": self.pins.pinned_tokens,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }
        for tier in self.tiers[1:]:
            result.update({f"{tier.name}_{k}": v for k, v in tier.counters().items()})
        return result
