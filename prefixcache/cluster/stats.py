"""One ``EngineStats`` for a deployment: the replicas' snapshots, summed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from prefixcache.engine.stats import DeviceBlocks, EngineStats, PinStats
from prefixcache.tiers.stats import TierStats


def merge_stats(snapshots: Sequence[EngineStats]) -> EngineStats:
    """Sum the counters and sizes of ``snapshots`` (tiers matched by position and name).

    ValueError for no snapshot, or replicas whose tiers differ (one configuration runs
    on every replica, so that is a deployment error).
    """
    if not snapshots:
        raise ValueError("no replica answered")
    first = snapshots[0]
    names = [t.name for t in first.tiers]
    for other in snapshots[1:]:
        if [t.name for t in other.tiers] != names:
            raise ValueError(f"replicas run different KV tiers: {names} and {other.tiers}")
    tiers = tuple(
        _sum(TierStats, [s.tiers[i] for s in snapshots], name=names[i]) for i in range(len(names))
    )
    return _sum(
        EngineStats,
        snapshots,
        prefix_caching=first.prefix_caching,
        block_size=first.block_size,
        tiers=tiers,
        device=_sum(DeviceBlocks, [s.device for s in snapshots]),
        pins=_sum(PinStats, [s.pins for s in snapshots]),
    )


def _sum(cls, values: Sequence, **fixed):
    """An instance of dataclass ``cls`` whose int fields are the sums over ``values``
    and whose other fields are ``fixed``."""
    fields = {}
    for field in dataclasses.fields(cls):
        if field.name in fixed:
            fields[field.name] = fixed[field.name]
        else:
            fields[field.name] = sum(getattr(v, field.name) for v in values)
    return cls(**fields)
