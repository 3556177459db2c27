"""Explicit cache control for the engine: pre-warm, pin with a TTL, unpin, flush."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prefixcache.cache.pins import PinHandle
from prefixcache.sampling_params import SamplingParams

if TYPE_CHECKING:
    from prefixcache.sdk import Prompt


class CacheControl:
    """Methods ``Engine`` gains for managing its prefix cache directly.

    Pins are locks on radix-tree nodes held by the engine's ``PinRegistry``.
    """

    def prewarm(
        self,
        prompt: Prompt | Sequence[dict],
        pin: bool = False,
        ttl: float | None = None,
        salt: str | None = None,
    ) -> PinHandle:
        """Prefill a prompt (text, token ids or a message list) into the cache, no reply.

        With ``pin`` the cached prefix is protected from eviction until ``unpin`` or
        until ``ttl`` seconds pass; a pin over the cap is refused before any work. A
        message list is rendered without the assistant header, so it is the prefix of
        any later conversation that extends it.
        """
        token_ids = self.prewarm_token_ids(prompt)
        if pin:
            self.check_pinnable(len(token_ids), ttl)
        self._run_all([self.prompt_tokens(token_ids)], SamplingParams(max_tokens=1), False, salt)
        if pin:
            return self.pin_prefix(token_ids, salt, ttl)
        return PinHandle(None, len(token_ids), self._cached_tokens(token_ids, salt), False)

    def prewarm_token_ids(self, prompt: Prompt | Sequence[dict]) -> list[int]:
        """Token ids ``prewarm`` caches for a text, token-id or message-list prompt."""
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
            return self.chat_prompt_ids(prompt, add_generation_prompt=False)
        return self.tokenize_prompt(prompt)

    def check_pinnable(self, num_tokens: int, ttl: float | None = None) -> None:
        """ValueError unless pinning ``num_tokens`` more tokens stays under the cap."""
        if self.pins is None:
            raise ValueError("cannot pin: prefix caching is disabled")
        if ttl is not None and not (isinstance(ttl, int | float) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        self.pins.expire()
        wanted = num_tokens // self.config.block_size * self.config.block_size
        if self.pins.pinned_tokens + wanted > self.pins.max_pinned_tokens:
            raise ValueError(
                f"pinning {wanted} more tokens would exceed the pinned-token cap "
                f"({self.pins.pinned_tokens} of {self.pins.max_pinned_tokens} in use)"
            )

    def pin_prefix(self, token_ids: list[int], salt: str | None, ttl: float | None) -> PinHandle:
        """Pin the already cached prefix of ``token_ids`` (see ``prewarm``)."""
        if self.pins is None:
            raise ValueError("cannot pin: prefix caching is disabled")
        handle, pinned = self.pins.pin(token_ids, salt, ttl)
        return PinHandle(handle, len(token_ids), pinned, True, self.pins.expires_at(handle))

    def _cached_tokens(self, token_ids: list[int], salt: str | None) -> int:
        cache = self.blocks.cache
        return cache.peek(token_ids, salt) if cache is not None else 0

    def unpin(self, handle: str | PinHandle) -> bool:
        """Release a pin made by ``prewarm(pin=True)``; False if it is unknown or expired."""
        key = handle.handle if isinstance(handle, PinHandle) else handle
        return self.pins is not None and key is not None and self.pins.unpin(key)

    def flush_cache(self) -> int:
        """Drop every device-cached entry that no request or pin holds; returns blocks
        freed. Host and disk tiers keep their chunks (they are bounded on their own)."""
        return self.blocks.cache.flush() if self.blocks.cache is not None else 0
