"""Prometheus metrics: request counters and latency histograms kept by the server,
plus the engine's own counters and block gauges read from ``engine.stats()``.

Each app has its own registry, so several servers can live in one process (tests).
The engine's counters are cumulative totals owned by the engine; a custom collector
reports them as Prometheus counters at scrape time instead of copying them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
)  # fmt: skip
_STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 120.0,
)  # fmt: skip
# engine.stats() key -> tier label, per counter. Tiers the engine does not report
# (yet) are simply absent from its stats and so from the output.
_HIT_KEYS = {"hit_tokens": "device", "host_hit_tokens": "host", "disk_hit_tokens": "disk"}
_EVICTION_KEYS = {"evicted_blocks": "device", "host_evicted_blocks": "host"}
# HTTP status -> outcome label for requests refused before reaching the engine.
_ERROR_OUTCOMES = {
    400: "invalid", 401: "unauthorized", 404: "not_found", 405: "invalid", 413: "invalid",
    429: "rejected",
}  # fmt: skip


class EngineStatsCollector(Collector):
    """Reports the last ``engine.stats()`` snapshot handed to ``update``."""

    def __init__(self) -> None:
        self._stats: Mapping[str, int] = {}

    def update(self, stats: Mapping[str, int] | None) -> None:
        """Replace the snapshot (None: the engine could not be asked; report nothing)."""
        self._stats = stats or {}

    def collect(self) -> Iterator[Metric]:
        """Counters for prefix-cache tokens and evictions; gauges for blocks and queues."""
        stats = self._stats
        if not stats:
            return
        queried = CounterMetricFamily(
            "prefixcache_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache.",
        )
        queried.add_metric([], stats.get("query_tokens", 0))
        yield queried
        yield _by_tier(
            "prefixcache_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache, by tier.",
            stats,
            _HIT_KEYS,
        )
        yield _by_tier(
            "prefixcache_prefix_cache_evicted_blocks",
            "KV blocks evicted from the prefix cache, by tier.",
            stats,
            _EVICTION_KEYS,
        )
        yield from _gauges(stats)


def _by_tier(name: str, doc: str, stats: Mapping[str, int], keys: Mapping[str, str]):
    family = CounterMetricFamily(name, doc, labels=["tier"])
    for key, tier in keys.items():
        if key in stats or tier == "device":
            family.add_metric([tier], stats.get(key, 0))
    return family


def _gauges(stats: Mapping[str, int]) -> Iterator[Metric]:
    total, free = stats.get("num_blocks", 0), stats.get("free_blocks", 0)
    evictable = stats.get("evictable_blocks", 0)
    values = {
        "prefixcache_kv_blocks_capacity": ("KV blocks in the device pool.", total),
        "prefixcache_kv_blocks_in_use": (
            "KV blocks held by requests (not free, not evictable cache).",
            total - free - evictable,
        ),
        "prefixcache_kv_blocks_cached": (
            "KV blocks held by the prefix cache.",
            stats.get("cached_blocks", 0),
        ),
        "prefixcache_kv_blocks_locked": (
            "Cached KV blocks locked by running requests.",
            stats.get("locked_blocks", 0),
        ),
        "prefixcache_requests_running": ("Requests being run.", stats.get("running", 0)),
        "prefixcache_requests_waiting": ("Requests queued in the engine.", stats.get("waiting", 0)),
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

    def render(self, stats: Mapping[str, int] | None) -> bytes:
        """The Prometheus text exposition, with ``stats`` as the engine snapshot."""
        self.engine.update(stats)
        return generate_latest(self.registry)
