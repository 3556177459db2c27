"""What every KV tier reports about itself: one typed value, the same fields for all."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class TierStats:
    """Sizes and counters of one tier (device, host, disk or any registered one).

    Fields a tier has no notion of stay 0 (a disk tier bounded by bytes reports
    ``capacity_bytes``; a host tier bounded by slots reports ``capacity_blocks``).
    """

    name: str
    capacity_blocks: int = 0  # KV blocks the tier can hold
    used_blocks: int = 0  # KV blocks holding data now
    capacity_bytes: int = 0
    used_bytes: int = 0
    entries: int = 0  # chunks (whole or partial) held
    hit_tokens: int = 0  # tokens served from this tier to the device
    stored_blocks: int = 0  # blocks written into the tier
    evicted_blocks: int = 0  # blocks the tier dropped to make room
    read_bytes: int = 0
    written_bytes: int = 0
    failures: int = 0  # operations that failed (an I/O error, a server gone) and were skipped
    dropped_writes: int = 0  # writes dropped because a tier's write-behind queue was full

    def counters(self) -> dict[str, int]:
        """Every numeric field by name (what flat stats and metrics are built from)."""
        values = asdict(self)
        del values["name"]
        return values
