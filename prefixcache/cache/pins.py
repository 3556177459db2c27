"""Pinned prefixes: cache entries held against eviction, optionally until a deadline.

A pin is a lock on a radix-tree node owned by the registry instead of a request, so
eviction (which only takes unlocked leaves) can never drop a pinned prefix.
"""

from __future__ import annotations

import heapq
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from prefixcache.cache.radix_cache import RadixCache
from prefixcache.cache.radix_node import TreeNode


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


class PinRegistry:
    """Holds pins, enforces the pinned-token cap, and expires pins past their TTL."""

    def __init__(
        self, cache: RadixCache, max_pinned_tokens: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cache = cache
        self.max_pinned_tokens = max_pinned_tokens
        self.clock = clock
        self._pins: dict[str, _Pin] = {}
        self._deadlines: list[tuple[float, str]] = []

    @property
    def pinned_tokens(self) -> int:
        """Tokens held by all pins (overlapping prefixes counted once per pin)."""
        return sum(pin.num_tokens for pin in self._pins.values())

    def __len__(self) -> int:
        return len(self._pins)

    def pin(self, token_ids, salt: str | None, ttl: float | None) -> tuple[str, int]:
        """Lock the cached prefix of ``token_ids``; returns (handle, pinned tokens).

        Raises ValueError (changing nothing) when the cap would be exceeded.
        """
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        self.expire()
        cached = self.cache.peek(token_ids, salt)
        if self.pinned_tokens + cached > self.max_pinned_tokens:
            raise ValueError(
                f"pinning {cached} more tokens would exceed the pinned-token cap "
                f"({self.pinned_tokens} of {self.max_pinned_tokens} in use)"
            )
        match = self.cache.match(token_ids, salt)
        # Random, so a handle from before a restart can never name a pin made after it.
        handle = f"pin-{secrets.token_hex(16)}"
        expires_at = self.clock() + ttl if ttl is not None else None
        self._pins[handle] = _Pin(match.node, match.num_tokens, expires_at)
        if expires_at is not None:
            heapq.heappush(self._deadlines, (expires_at, handle))
        return handle, match.num_tokens

    def expires_at(self, handle: str) -> float | None:
        """The deadline of a pin (None if it has none)."""
        return self._pins[handle].expires_at

    def unpin(self, handle: str) -> bool:
        """Release a pin; False if there is no such (live) pin."""
        pin = self._pins.pop(handle, None)
        if pin is None:
            return False
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
