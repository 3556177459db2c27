"""Pinned prefixes: cache entries held against eviction, optionally until a deadline.

A pin is a lock on a radix-tree node owned by the registry instead of a request, so
eviction (which only takes unlocked leaves) can never drop a pinned prefix.

Pins are capped in total and per tenant (the tenant of a salt, ``salt_tenant``). A
refusal names only the caller's own pins: how much another tenant holds is none of
its business.
"""

from __future__ import annotations

import heapq
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from prefixcache.cache.radix_cache import RadixCache
from prefixcache.cache.radix_node import TreeNode
from prefixcache.cache.tenants import salt_tenant


@dataclass(frozen=True, slots=True)
class PinHandle:
    """What ``Engine.prewarm`` returns: the cached prefix and, if pinned, its handle."""

    handle: str | None
    num_tokens: int
    num_cached_tokens: int
    pinned: bool
    expires_at: float | None = None


@dataclass(slots=True)
class _Pin:
    node: TreeNode
    num_tokens: int
    expires_at: float | None
    tenant: str


class PinRegistry:
    """Holds pins, enforces the pinned-token caps (in total and per tenant), and
    expires pins past their TTL. ``max_pinned_tokens_per_tenant`` defaults to the
    total cap."""

    def __init__(
        self,
        cache: RadixCache,
        max_pinned_tokens: int,
        clock: Callable[[], float] = time.monotonic,
        max_pinned_tokens_per_tenant: int | None = None,
    ) -> None:
        self.cache = cache
        self.max_pinned_tokens = max_pinned_tokens
        per_tenant = max_pinned_tokens_per_tenant
        self.max_pinned_tokens_per_tenant = max_pinned_tokens if per_tenant is None else per_tenant
        self.clock = clock
        self._pins: dict[str, _Pin] = {}
        self._tenant_tokens: dict[str, int] = {}
        self._deadlines: list[tuple[float, str]] = []

    @property
    def pinned_tokens(self) -> int:
        """Tokens held by all pins (overlapping prefixes counted once per pin)."""
        return sum(self._tenant_tokens.values())

    def tenant_tokens(self, salt: str | None) -> int:
        """Tokens held by the pins of ``salt``'s tenant."""
        return self._tenant_tokens.get(salt_tenant(salt), 0)

    def __len__(self) -> int:
        return len(self._pins)

    def check(self, num_tokens: int, salt: str | None) -> None:
        """ValueError unless ``salt``'s tenant may pin ``num_tokens`` more tokens; the
        message names only that tenant's own pins."""
        own, quota = self.tenant_tokens(salt), self.max_pinned_tokens_per_tenant
        if own + num_tokens > quota:
            raise ValueError(
                f"pinning {num_tokens} more tokens would exceed your pinned-token cap "
                f"({own} of {quota} tokens in use by your pins)"
            )
        if self.pinned_tokens + num_tokens > self.max_pinned_tokens:
            raise ValueError(
                f"pinning {num_tokens} more tokens would exceed the server's pinned-token cap "
                f"(shared by all keys); your pins hold {own} of your {quota}"
            )

    def pin(self, token_ids, salt: str | None, ttl: float | None) -> tuple[str, int]:
        """Lock the cached prefix of ``token_ids``; returns (handle, pinned tokens).

        Raises ValueError (changing nothing) when the cap would be exceeded.
        """
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        self.expire()
        self.check(self.cache.peek(token_ids, salt), salt)
        match = self.cache.match(token_ids, salt, count=False)  # a pin is no request
        # Random, so a handle from before a restart can never name a pin made after it.
        handle = f"pin-{secrets.token_hex(16)}"
        expires_at = self.clock() + ttl if ttl is not None else None
        tenant = salt_tenant(salt)
        self._pins[handle] = _Pin(match.node, match.num_tokens, expires_at, tenant)
        self._tenant_tokens[tenant] = self._tenant_tokens.get(tenant, 0) + match.num_tokens
        if expires_at is not None:
            heapq.heappush(self._deadlines, (expires_at, handle))
        return handle, match.num_tokens

    def nodes(self) -> list[TreeNode]:
        """The node each live pin holds locked (one per pin)."""
        return [pin.node for pin in self._pins.values()]

    def expires_at(self, handle: str) -> float | None:
        """The deadline of a pin (None if it has none)."""
        return self._pins[handle].expires_at

    def unpin(self, handle: str) -> bool:
        """Release a pin; False if there is no such (live) pin."""
        pin = self._pins.pop(handle, None)
        if pin is None:
            return False
        left = self._tenant_tokens[pin.tenant] - pin.num_tokens
        if left:
            self._tenant_tokens[pin.tenant] = left
        else:
            del self._tenant_tokens[pin.tenant]
        self.cache.unlock(pin.node)
        return True

    def expire(self) -> int:
        """Release every pin whose TTL has passed; returns how many."""
        now, expired = self.clock(), 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, handle = heapq.heappop(self._deadlines)
            expired += self.unpin(handle)
        return expired

    def clear(self) -> None:
        """Release all pins."""
        for handle in list(self._pins):
            self.unpin(handle)
