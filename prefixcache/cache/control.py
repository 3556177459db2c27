"""Explicit cache control, composed into the engine core: pin, peek, unpin, flush.

Pins are locks on radix-tree nodes held by a ``PinRegistry``. Everything here runs on
the thread that steps the engine (the SDK's, or the engine loop's).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefixcache.cache.block_manager import BlockManager
from prefixcache.cache.pins import PinHandle, PinRegistry
from prefixcache.engine.stats import PinStats


class CacheControl:
    """Pins, peeks and flushes over one engine's prefix cache (None when caching is off)."""

    def __init__(
        self,
        blocks: BlockManager,
        max_pinned_tokens: int,
        max_pinned_tokens_per_tenant: int | None = None,
        cache_salt: Callable[[int, str | None], str | None] | None = None,
    ) -> None:
        self.blocks = blocks
        # (prompt length, salt) -> the salt a request of that prompt is cached under.
        self._cache_salt = cache_salt or (lambda _num_tokens, salt: salt)
        cache = blocks.cache
        self.pins = (
            PinRegistry(
                cache, max_pinned_tokens, max_pinned_tokens_per_tenant=max_pinned_tokens_per_tenant
            )
            if cache is not None
            else None
        )

    def expire(self) -> None:
        """Release pins whose TTL has passed."""
        if self.pins is not None:
            self.pins.expire()

    def check_pinnable(
        self, num_tokens: int, ttl: float | None = None, salt: str | None = None
    ) -> None:
        """ValueError unless ``salt``'s tenant may pin ``num_tokens`` more tokens (its
        own quota and the total cap)."""
        pins = self._pins()
        if ttl is not None and not (isinstance(ttl, int | float) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        pins.expire()
        block_size = self.blocks.block_size
        pins.check(num_tokens // block_size * block_size, salt)

    def pin(self, token_ids, salt: str | None, ttl: float | None) -> PinHandle:
        """Pin the cached prefix of ``token_ids``; ``expires_at`` is Unix time (or None)."""
        pins = self._pins()
        handle, pinned = pins.pin(token_ids, self._cache_salt(len(token_ids), salt), ttl)
        deadline = pins.expires_at(handle)
        expires_at = None if deadline is None else time.time() + (deadline - pins.clock())
        return PinHandle(handle, len(token_ids), pinned, True, expires_at)

    def peek(self, token_ids, salt: str | None) -> int:
        """Tokens of ``token_ids`` the device cache holds now (changes nothing)."""
        cache = self.blocks.cache
        if cache is None:
            return 0
        return cache.peek(token_ids, self._cache_salt(len(token_ids), salt))

    def unpin(self, handle: str | PinHandle) -> bool:
        """Release a pin; False if it is unknown or expired."""
        key = handle.handle if isinstance(handle, PinHandle) else handle
        return self.pins is not None and key is not None and self.pins.unpin(key)

    def flush(self, tenant: str | None = None) -> int:
        """Drop every device-cached entry no request or pin holds (only ``tenant``'s,
        see ``salt_tenant``, when given); returns blocks freed."""
        cache = self.blocks.cache
        return cache.flush(tenant) if cache is not None else 0

    def pin_stats(self) -> PinStats:
        """Pins held now and the cap."""
        pins = self.pins
        if pins is None:
            return PinStats(0, 0, 0)
        return PinStats(len(pins), pins.pinned_tokens, pins.max_pinned_tokens)

    def _pins(self) -> PinRegistry:
        if self.pins is None:
            raise ValueError("cannot pin: prefix caching is disabled")
        return self.pins
