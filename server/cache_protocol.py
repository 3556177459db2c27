"""Request and response bodies of the cache-control endpoints (``/v1/cache``)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from server.chat_protocol import ChatMessage, TokenId

# Up to ten years: finite, so no deadline overflows the clock.
TtlSeconds = Annotated[float, Meta(gt=0.0, le=3.2e8)]


class CachePrewarmRequest(Struct, kw_only=True):
    """``POST /v1/cache/prewarm``: exactly one of ``messages`` or ``prompt``.

    A message list is cached without the assistant header, so it is the prefix of any
    later chat that extends it. With ``pin`` the prefix is held against eviction
    until it is deleted or ``ttl_s`` seconds pass.
    """

    model: str | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    prompt: str | list[TokenId] | None = None
    pin: bool = False
    ttl_s: TtlSeconds | None = None
    cache_salt: str | None = None
    """Extra prefix-cache isolation on top of the caller's API key, as in completions."""


class CachePrewarmResponse(Struct, kw_only=True):
    """What a pre-warm cached; ``handle`` (pinned only) is what ``DELETE`` takes."""

    object: str = "cache.prewarm"
    handle: str | None
    num_tokens: int
    num_cached_tokens: int
    """Leading prompt tokens now in the cache (whole KV blocks)."""
    num_reused_tokens: int
    """Of those, how many were already cached before this call."""
    pinned: bool
    expires_at: float | None = None
    """Unix time at which the pin lapses; null for a pin without a TTL."""


class CacheUnpinResponse(Struct, kw_only=True):
    """``DELETE /v1/cache/pins/{handle}``."""

    object: str = "cache.pin"
    handle: str
    deleted: bool = True


class CacheFlushResponse(Struct, kw_only=True):
    """``POST /v1/cache/flush``: what was dropped."""

    object: str = "cache.flush"
    freed_blocks: int
    freed_tokens: int


class CacheTier(Struct, kw_only=True):
    """One cache tier: the device first, then each tier behind it in lookup order.

    Every tier reports the same fields (0 where a tier has no such notion); the
    device also says how its blocks split into free, evictable and locked.
    """

    name: str
    capacity_blocks: int
    cached_blocks: int  # blocks holding cached KV now
    capacity_bytes: int = 0
    used_bytes: int = 0
    entries: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    failures: int = 0
    dropped_writes: int = 0
    free_blocks: int = 0
    evictable_blocks: int = 0
    locked_blocks: int = 0


class CacheCounters(Struct, kw_only=True):
    """Prefix-cache counters since the server started."""

    query_tokens: int
    hit_tokens: int
    hit_rate: float
    evicted_blocks: int


class CachePins(Struct, kw_only=True):
    """Pins held now and the cap on the tokens they may hold."""

    count: int
    pinned_tokens: int
    max_pinned_tokens: int


class CacheInfo(Struct, kw_only=True):
    """``GET /v1/cache``: sizes per tier, counters and pins (all tenants together)."""

    object: str = "cache"
    block_size: int
    prefix_caching: bool
    tiers: list[CacheTier]
    counters: CacheCounters
    pins: CachePins


_PROMPT = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer", "x-token-id": True}, "minItems": 1},
    ]
}
# Exactly one of ``messages`` or ``prompt`` (a null one counts as not given).
DOCUMENTED = {
    "CachePrewarmRequest": {
        "properties": {"prompt": {"anyOf": [*_PROMPT["anyOf"], {"type": "null"}]}},
        "oneOf": [
            {"properties": {"messages": {"type": "array"}}, "required": ["messages"]},
            {"properties": {"prompt": _PROMPT}, "required": ["prompt"]},
        ],
    }
}

CACHE_TYPES = (
    CachePrewarmRequest,
    CachePrewarmResponse,
    CacheUnpinResponse,
    CacheFlushResponse,
    CacheInfo,
)
