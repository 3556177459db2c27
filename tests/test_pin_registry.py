"""PinRegistry on a real radix cache: the caps at their edges, per-tenant accounting,
TTL expiry at the deadline, and release of every pin."""

from __future__ import annotations

import pytest

from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.pins import PinRegistry
from prefixcache.cache.radix_cache import RadixCache

BS = 2  # block size


class _Clock:
    """A settable clock for the registry (its ``clock`` argument)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _registry(total: int, per_tenant: int | None = None) -> tuple[PinRegistry, _Clock]:
    cache = RadixCache(BlockPool(64), block_size=BS, chunk_size=4, fingerprint="m")
    clock = _Clock()
    return PinRegistry(cache, total, clock, max_pinned_tokens_per_tenant=per_tenant), clock


def _cached(registry: PinRegistry, tokens: list[int], salt: str | None = None) -> list[int]:
    """Put ``tokens`` in the cache (as a finished request would) and return them."""
    cache = registry.cache
    hit = cache.match(tokens, salt)
    fresh = cache.pool.allocate(len(tokens) // BS - len(hit.block_ids))
    cache.insert(tokens, hit.block_ids + fresh, salt)
    cache.unlock(hit.node)
    return tokens


def test_a_tenant_may_pin_exactly_up_to_its_cap_but_not_past_it():
    registry, _ = _registry(total=100, per_tenant=8)
    assert registry.tenant_tokens("a:x") == 0  # no pins yet: nothing in use
    _, pinned = registry.pin(_cached(registry, list(range(8)), "a:x"), "a:x", None)
    assert pinned == 8 and registry.tenant_tokens("a:x") == 8
    more = _cached(registry, [9, 9], "a:y")
    with pytest.raises(ValueError, match="your pinned-token cap"):
        registry.pin(more, "a:y", None)  # another salt of the same tenant shares its cap
    assert len(registry) == 1 and registry.tenant_tokens("a:x") == 8


def test_the_per_tenant_cap_refuses_a_tenant_while_the_total_has_room():
    registry, _ = _registry(total=100, per_tenant=4)
    tokens = _cached(registry, list(range(6)), "a")
    with pytest.raises(ValueError, match="your pinned-token cap"):
        registry.pin(tokens, "a", None)
    assert len(registry) == 0 and registry.pinned_tokens == 0
    registry.cache.check_integrity()  # the refused pin left no lock behind


def test_the_per_tenant_cap_defaults_to_the_total_cap():
    registry, _ = _registry(total=6)
    assert registry.max_pinned_tokens_per_tenant == 6
    registry.pin(_cached(registry, list(range(6)), "a"), "a", None)  # exactly the cap


def test_the_total_cap_is_reached_exactly_and_then_refuses_every_tenant():
    registry, _ = _registry(total=8, per_tenant=6)
    registry.pin(_cached(registry, list(range(4)), "a"), "a", None)
    registry.pin(_cached(registry, list(range(4)), "b"), "b", None)  # 8 of 8
    with pytest.raises(ValueError, match="server's pinned-token cap"):
        registry.pin(_cached(registry, [7, 7], "c"), "c", None)
    assert registry.pinned_tokens == 8 and registry.tenant_tokens("c") == 0


def test_the_cap_counts_the_cached_prefix_of_the_pinning_tenant_only():
    # The unsalted tree holds nothing; the salted one holds 6 tokens over a cap of 4.
    registry, _ = _registry(total=100, per_tenant=4)
    tokens = _cached(registry, list(range(6)), "t")
    with pytest.raises(ValueError, match="6 more tokens"):
        registry.pin(tokens, "t", None)


def test_a_tenants_second_pin_adds_to_its_count_and_unpinning_one_leaves_the_other():
    registry, _ = _registry(total=100)
    first, _ = registry.pin(_cached(registry, list(range(4)), "a"), "a", None)
    second, _ = registry.pin(_cached(registry, list(range(10, 16)), "a"), "a", None)
    assert registry.tenant_tokens("a") == 10 and registry.pinned_tokens == 10
    assert registry.unpin(first)
    assert registry.tenant_tokens("a") == 6 and registry.pinned_tokens == 6
    assert registry.unpin(second) and registry.tenant_tokens("a") == 0
    assert not registry.unpin(second)


def test_ttl_must_be_positive_and_may_be_a_fraction_of_a_second():
    registry, clock = _registry(total=100)
    tokens = _cached(registry, list(range(4)))
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="ttl must be a positive number"):
            registry.pin(tokens, None, bad)
    assert len(registry) == 0
    handle, _ = registry.pin(tokens, None, 0.5)
    assert registry.expires_at(handle) == clock.now + 0.5


def test_pins_expire_at_their_deadline_and_expire_counts_them():
    registry, clock = _registry(total=100)
    assert registry.expire() == 0
    for start in (0, 10, 20):
        registry.pin(_cached(registry, list(range(start, start + 4))), None, 5.0)
    late, _ = registry.pin(_cached(registry, list(range(30, 34))), None, 9.0)
    clock.now += 5.0  # exactly the deadline of the first three
    assert registry.expire() == 3
    assert len(registry) == 1 and registry.expires_at(late) == clock.now + 4.0
    assert registry.pinned_tokens == 4


def test_clear_releases_every_pin_and_its_locks():
    registry, _ = _registry(total=100)
    for salt in ("a", "b", None):
        registry.pin(_cached(registry, list(range(6)), salt), salt, 30.0)
    assert registry.cache.num_locked_blocks == 9
    registry.clear()
    assert len(registry) == 0 and registry.pinned_tokens == 0
    assert registry.cache.num_locked_blocks == 0
    registry.cache.check_integrity()
