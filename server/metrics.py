"""Prometheus metrics: request counters and latency histograms kept by the server,
plus the engine's own counters and block gauges from its ``EngineStats`` snapshot.

Each app has its own registry, so several servers can live in one process (tests).
The engine's counters are cumulative totals owned by the engine; a custom collector
reports them as Prometheus counters at scrape time instead of copying them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prefixcache.client import EngineStats

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
)  # fmt: skip
_STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 120.0,
)  # fmt: skip
# HTTP status -> outcome label for requests refused before reaching the engine.
_ERROR_OUTCOMES = {
    400: "invalid", 401: "unauthorized", 404: "not_found", 405: "invalid", 413: "invalid",
    429: "rejected",
}  # fmt: skip


class EngineStatsCollector(Collector):
    """Reports the last ``EngineStats`` snapshot handed to ``update``.

    Every tier (the device, then each tier behind it) is one ``tier`` label value of
    the same families, so a tier registered later shows up with no change here.
    """

    def __init__(self) -> None:
        self._stats: EngineStats | None = None

    def update(self, stats: EngineStats | None) -> None:
        """Replace the snapshot (None: the engine could not be asked; report nothing)."""
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """Counters for prefix-cache tokens and per-tier traffic; gauges for blocks."""
        stats = self._stats
        if stats is None:
            return
        queried = CounterMetricFamily(
            "prefixcache_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache.",
        )
        queried.add_metric([], stats.query_tokens)
        yield queried
        for field, (name, doc) in _TIER_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["tier"])
            for tier in stats.tiers:
                family.add_metric([tier.name], getattr(tier, field))
            yield family
        for field, (name, doc) in _TIER_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["tier"])
            for tier in stats.tiers:
                family.add_metric([tier.name], getattr(tier, field))
            yield family
        yield from _gauges(stats)


# TierStats field -> (metric, help), reported for every tier with a ``tier`` label.
_TIER_COUNTERS = {
    "hit_tokens": ("prefixcache_prefix_cache_hit_tokens", "Prompt tokens served, by tier."),
    "evicted_blocks": (
        "prefixcache_prefix_cache_evicted_blocks",
        "KV blocks evicted, by tier.",
    ),
    "stored_blocks": ("prefixcache_tier_stored_blocks", "KV blocks written into a tier."),
    "read_bytes": ("prefixcache_tier_read_bytes", "Bytes read from a tier."),
    "written_bytes": ("prefixcache_tier_written_bytes", "Bytes written to a tier."),
    "failures": ("prefixcache_tier_failures", "Tier operations that failed and were skipped."),
    "dropped_writes": (
        "prefixcache_tier_dropped_writes",
        "Tier writes dropped because the tier's write queue was full.",
    ),
}
_TIER_GAUGES = {
    "capacity_blocks": ("prefixcache_tier_capacity_blocks", "KV blocks a tier can hold."),
    "used_blocks": ("prefixcache_tier_used_blocks", "KV blocks a tier holds now."),
    "used_bytes": ("prefixcache_tier_used_bytes", "Bytes a tier holds now."),
    "entries": ("prefixcache_tier_entries", "Chunks a tier holds now."),
}


def _gauges(stats: EngineStats) -> Iterator[Metric]:
    blocks = stats.device
    values = {
        "prefixcache_kv_blocks_capacity": ("KV blocks in the device pool.", blocks.total),
        "prefixcache_kv_blocks_in_use": (
            "KV blocks held by requests (not free, not evictable cache).",
            blocks.total - blocks.free - blocks.evictable,
        ),
        "prefixcache_kv_blocks_cached": ("KV blocks held by the prefix cache.", blocks.cached),
        "prefixcache_kv_blocks_locked": (
            "Cached KV blocks locked by running requests.",
            blocks.locked,
        ),
        "prefixcache_requests_running": ("Requests being run.", stats.running),
        "prefixcache_requests_waiting": ("Requests queued in the engine.", stats.waiting),
    }
    for name, (doc, value) in values.items():
        yield GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    """Every metric one server exposes, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.prompt_tokens = Counter(
            "prefixcache_prompt_tokens", "Prompt tokens of accepted requests.", registry=reg
        )
        self.generation_tokens = Counter(
            "prefixcache_generation_tokens", "Tokens generated.", registry=reg
        )
        self.cached_prompt_tokens = Counter(
            "prefixcache_cached_prompt_tokens",
            "Prompt tokens of finished requests that came from the prefix cache.",
            registry=reg,
        )
        self.requests = Counter(
            "prefixcache_requests",
            "Requests by outcome: stop, length, abort, error, invalid, unauthorized, "
            "not_found, rejected.",
            ["outcome"],
            registry=reg,
        )
        self.ttft = Histogram(
            "prefixcache_time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "prefixcache_e2e_request_latency_seconds",
            "Seconds from arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.stages = Histogram(
            "prefixcache_request_stage_seconds",
            "Seconds finished requests spent per stage: request_decode, tokenize, queue, "
            "lookup, prefill (admission to first token) and decode (first to last token).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=reg,
        )
        self.in_flight = Gauge(
            "prefixcache_server_requests_in_flight",
            "Requests admitted by the server and not yet answered (the 429 limit counts these).",
            registry=reg,
        )
        self.engine = EngineStatsCollector()
        reg.register(self.engine)

    def record_stages(self, seconds: Mapping[str, float]) -> None:
        """Observe one finished request's seconds per stage."""
        for stage, value in seconds.items():
            self.stages.labels(stage).observe(value)

    def record_error(self, status: int) -> None:
        """Count a request refused with ``status``."""
        self.requests.labels(_ERROR_OUTCOMES.get(status, "error")).inc()

    def render(self, stats: EngineStats | None) -> bytes:
        """The Prometheus text exposition, with ``stats`` as the engine snapshot."""
        self.engine.update(stats)
        return generate_latest(self.registry)
