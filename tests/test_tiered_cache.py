"""TieredCache's moves that engine tests reach only by chance, played through a real
BlockManager without a model (the rig of ``test_block_manager_tiers``): a first tier
that fails on every call, a chunk evicted while an onload holds stores back, chunks
the last local tier drops handed on to a shared tier, and the cache events of each."""

from __future__ import annotations

import logging

import pytest
import torch
from test_block_manager_tiers import BS, CHUNK_SHAPE, CS, FINGERPRINT, _evict_all, _Rig, _tokens
from test_kv_tier_registry import DictTier

from chunking.hashing import chunk_hashes, root_seed
from prefixcache.cache.events import CacheEvents
from prefixcache.tiers.host import HostTier


class SharedHostTier(HostTier):
    """Host memory marked shared: the place of a server every engine reads (Redis)."""

    name = "shared"
    shared = True


class UnreachableTier(HostTier):
    """A tier whose every call fails, like a server that is gone."""

    name = "unreachable"

    def contains(self, query):
        raise ConnectionError("tier unreachable")

    touch = get = put = discard = contains  # each logged as "failed in contains"


class UntouchableTier(HostTier):
    """Serves chunks, but fails when asked to mark one used (a flaky server)."""

    def touch(self, query):
        raise ConnectionError("tier unreachable")


class MangledTier(HostTier):
    """Returns its chunks damaged: data of another shape or dtype, or none at all."""

    def __init__(self, damage: str) -> None:
        super().__init__(8, CHUNK_SHAPE, torch.float32)
        self.name, self.damage = f"mangled-{damage}", damage

    def get(self, query):
        chunk = super().get(query)
        if chunk is None:
            return None
        data = {
            "truncated": lambda d: d[:, :, :1],
            "float64": lambda d: d.double(),
            "missing": lambda d: None,
        }[self.damage](chunk.data)
        return chunk._replace(data=data)


class PersistentDictTier(DictTier):
    """A key-addressed tier that keeps its chunks across engines (a store on a server)."""

    name = "persistent-dict"
    persistent = True


def _host(num_chunks: int, cls=HostTier) -> HostTier:
    return cls(num_chunks, CHUNK_SHAPE, torch.float32)


class _Events:
    """A ``CacheEvents`` with a subscriber, so that events are recorded."""

    def __init__(self) -> None:
        self.events, self.batches = CacheEvents(), []
        self.events.subscribe(self.batches.append)

    def evicted(self) -> list[tuple[str | None, int]]:
        """(salt, hash) of every chunk recorded as evicted so far, in order."""
        self.events.publish()
        return [
            (event.salt, h)
            for batch in self.batches
            for event in batch
            if event.kind == "evicted"
            for h in event.chunk_hashes
        ]


def _chain(tokens: list[int], salt: str | None = None) -> list[int]:
    return chunk_hashes(tokens, CS, root_seed(FINGERPRINT, salt))


def _failures(rig: _Rig) -> list[int]:
    return [stats.failures for stats in rig.tiers.tier_stats()]


def test_a_tier_is_found_by_name_and_an_unknown_name_is_a_key_error_naming_it():
    rig = _Rig(host_chunks=2, more_tiers=[_host(2, SharedHostTier)])
    assert rig.tier("shared") is rig.tiers.tiers[1]
    with pytest.raises(KeyError) as error:
        rig.tier("nope")
    assert error.value.args == ("nope",)


def test_a_first_tier_that_fails_counts_against_it_and_its_chunks_are_evicted():
    """Each chunk offloaded to a tier that raises costs it three failures (is it held,
    store it, is it held now); no chunk is taken, so each is recorded as evicted, with
    its tenant's salt, and nothing comes back."""
    events = _Events()
    rig = _Rig(more_tiers=[_host(4, UnreachableTier), _host(4)], events=events.events)
    prompt = _tokens(1, 12)  # three whole chunks
    rig.serve(prompt, salt="alice:")
    before = _failures(rig)
    _evict_all(rig)
    after = _failures(rig)
    assert (after[0] - before[0], after[1]) == (9, 0)
    assert events.evicted() == [("alice:", h) for h in reversed(_chain(prompt, "alice:"))]
    assert rig.serve(prompt, salt="alice:") == 0
    rig.tiers.check_integrity()


def test_a_chunk_offloaded_to_a_tier_that_takes_it_is_not_evicted_and_nothing_fails():
    events = _Events()
    rig = _Rig(host_chunks=8, events=events.events)
    prompt = _tokens(2, 12)
    rig.serve(prompt, salt="bob:")
    _evict_all(rig)
    assert events.evicted() == []
    assert _failures(rig) == [0]
    assert rig.serve(prompt + [1], salt="bob:") == 12


def test_chunks_evicted_to_make_room_for_an_onload_are_not_reported_evicted():
    """While an onload copies chunks in, the device blocks it takes come from evicting
    other chunks: those are stored in the host tier after the copies, so they never
    left the engine and no event says they did."""
    events = _Events()
    rig = _Rig(num_blocks=8, host_chunks=8, events=events.events)
    first, second = _tokens(3, 8), _tokens(4, 12)
    rig.serve(first)
    _evict_all(rig)  # ``first`` is in the host tier only
    rig.serve(second)  # six of the eight device blocks
    assert rig.serve(first + [1]) == 8  # onloaded into blocks of ``second``
    assert rig.blocks.cache.stats.evicted_blocks > 6  # some of ``second`` had to go
    assert events.evicted() == []
    assert rig.serve(second + [1]) == 12  # its evicted chunks are in the host tier
    assert _failures(rig) == [0]


def test_chunks_the_last_local_tier_drops_go_on_to_the_shared_tier_and_come_back():
    """host (1 chunk) -> host (1 chunk) -> shared: the chunk the second, last local
    tier drops is recorded as evicted (this engine holds it no more) and handed to the
    shared tier, which serves it back."""
    events = _Events()
    shared = _host(8, SharedHostTier)
    rig = _Rig(more_tiers=[_host(1), _host(1), shared], events=events.events)
    prompt = _tokens(5, 12)
    rig.serve(prompt)
    _evict_all(rig)  # suffix first: chunk 2, then 1, then 0 into the first tier
    held = [tier.num_used_blocks // 2 for tier in rig.tiers.tiers]
    assert held == [1, 1, 1]
    assert events.evicted() == [(None, _chain(prompt)[2])]
    assert rig.serve(prompt + [1]) == 12
    assert rig.tiers.tier_stats()[2].hit_tokens == CS  # chunk 2 came from the shared tier
    assert _failures(rig) == [0, 0, 0]


def test_chunks_the_host_tier_passes_to_disk_during_an_offload_are_not_evicted(tmp_path):
    """A run of three chunks into a host tier of one: it hands two on to the disk tier
    while taking the run, and the engine still holds all three."""
    events = _Events()
    rig = _Rig(host_chunks=1, disk=tmp_path, events=events.events)
    prompt = _tokens(6, 12)
    rig.serve(prompt, salt="carol:")
    _evict_all(rig)
    assert events.evicted() == []
    assert rig.serve(prompt + [1], salt="carol:") == 12


def test_bytes_moved_each_way_add_up_over_offloads_and_onloads():
    rig = _Rig(host_chunks=8)
    block_bytes = rig.tiers.transfer.block_bytes
    prompt = _tokens(7, 12)
    rig.serve(prompt)
    _evict_all(rig)
    assert rig.tiers.counters.offloaded_bytes == 6 * block_bytes
    assert rig.serve(prompt + [1]) == 12
    assert rig.tiers.counters.onloaded_bytes == 6 * block_bytes
    _evict_all(rig)  # the same chunks again: held already, nothing read
    rig.serve(_tokens(8, 4))
    _evict_all(rig)
    assert rig.tiers.counters.offloaded_bytes == 8 * block_bytes
    assert rig.serve(prompt + [1]) == 12
    assert rig.tiers.counters.onloaded_bytes == 12 * block_bytes


def test_a_chunk_the_only_local_tier_drops_is_evicted_once_the_device_has_it_no_more():
    events = _Events()
    rig = _Rig(host_chunks=1, events=events.events)
    rig.tiers.check_integrity()  # nothing held back before the first onload
    first, second = _tokens(9, 4), _tokens(10, 4)
    rig.serve(first)
    _evict_all(rig)
    assert events.evicted() == []
    rig.serve(second)
    _evict_all(rig)  # the host tier makes room: ``first`` leaves the engine
    assert events.evicted() == [(None, _chain(first)[0])]
    assert _failures(rig) == [0]


def test_with_only_a_shared_tier_every_offloaded_chunk_leaves_the_engine():
    """A shared tier holds chunks for every engine, not for this one: each evicted
    chunk is recorded as evicted, and the shared tier dropping one records nothing."""
    events = _Events()
    rig = _Rig(more_tiers=[_host(1, SharedHostTier)], events=events.events)
    first, second = _tokens(11, 8), _tokens(12, 4)
    rig.serve(first, salt="dan:")
    _evict_all(rig)  # two chunks into a tier of one: it drops the second
    assert events.evicted() == [("dan:", h) for h in reversed(_chain(first, "dan:"))]
    assert rig.serve(first + [1], salt="dan:") == 4  # the first chunk, from the shared tier
    rig.serve(second)
    _evict_all(rig)
    assert len(events.evicted()) == 2 + 2 + 1  # the onloaded chunk, and ``second``
    assert _failures(rig) == [0]


def test_chunks_move_down_through_every_local_tier_in_turn():
    rig = _Rig(more_tiers=[_host(1), _host(1), _host(1)])
    prompt = _tokens(13, 12)
    rig.serve(prompt)
    _evict_all(rig)
    assert [tier.num_used_blocks for tier in rig.tiers.tiers] == [2, 2, 2]
    assert rig.serve(prompt + [1]) == 12
    assert _failures(rig) == [0, 0, 0]


def test_a_chunk_trimmed_block_by_block_is_stored_once_and_the_rest_still_follow():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(14, 12)
    rig.serve(prompt)
    rig.blocks.cache.evict(1)  # the last chunk goes to the host tier whole
    _evict_all(rig)  # then the rest: the last chunk's remains are held already
    assert rig.tier("host").num_used_blocks == 6
    assert rig.serve(prompt + [1]) == 12


@pytest.mark.parametrize("damage", ["truncated", "float64", "missing"])
def test_a_damaged_chunk_from_a_tier_is_a_miss(damage, caplog):
    """Data of the wrong shape or dtype is discarded from the tier, with a warning;
    data that cannot even be checked counts as the tier's failure. Either way the
    request computes its prompt again, and the healthy chunk below is never shadowed."""
    mangled = MangledTier(damage)
    rig = _Rig(more_tiers=[mangled])
    prompt = _tokens(15, 8)
    rig.serve(prompt)
    _evict_all(rig)
    with caplog.at_level(logging.WARNING, logger="prefixcache.tiers.tiered"):
        assert rig.serve(prompt + [1]) == 0
    if damage == "missing":
        assert _failures(rig) == [1]  # the first chunk: the second is never asked for
        assert mangled.num_used_blocks == 4
    else:
        assert _failures(rig) == [0]
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert messages == [f"tier '{mangled.name}' returned a chunk that does not match"]
        assert mangled.num_used_blocks == 2  # the first chunk discarded; not asked further


def test_a_tier_that_fails_to_mark_a_served_chunk_used_still_serves_it():
    rig = _Rig(more_tiers=[_host(8, UntouchableTier)])
    prompt = _tokens(16, 8)
    rig.serve(prompt)
    _evict_all(rig)
    assert rig.serve(prompt + [1]) == 8
    assert _failures(rig) == [2]  # one touch per chunk served


def test_a_key_addressed_tier_serves_every_chunk_by_its_chained_name():
    """A tier that finds chunks by key alone (a key-value server) needs each chunk's
    seed to be the hash of the chunk before it, for evicted and written-through chunks."""
    rig = _Rig(more_tiers=[DictTier(1 << 20, BS)])
    prompt = _tokens(17, 12)
    rig.serve(prompt)
    _evict_all(rig)
    assert rig.serve(prompt + [1]) == 12
    store = PersistentDictTier(1 << 20, BS)
    first = _Rig(more_tiers=[store])
    first.serve(prompt)  # written through, never evicted
    assert _Rig(more_tiers=[store]).serve(prompt + [1]) == 12  # another engine
    assert _failures(rig) == _failures(first) == [0]


def test_a_persistent_tier_that_fails_to_mark_a_chunk_used_still_gets_it_written():
    class FlakyStore(PersistentDictTier):
        def touch(self, query):
            raise ConnectionError("tier unreachable")

    store = FlakyStore(1 << 20, BS)
    rig = _Rig(more_tiers=[store])
    rig.serve(_tokens(18, 8))
    assert len(store.chunks) == 2
    assert _failures(rig)[0] >= 2  # each write asks first whether the chunk is there


def test_a_failing_tier_warns_with_a_traceback_once_then_logs_quietly(caplog):
    rig = _Rig(more_tiers=[_host(4, UnreachableTier)])
    with caplog.at_level(logging.DEBUG, logger="prefixcache.tiers.tiered"):
        rig.serve(_tokens(19, 8))
        _evict_all(rig)
    records = [r for r in caplog.records if r.name == "prefixcache.tiers.tiered"]
    assert len(records) == _failures(rig)[0] > 1
    first, *rest = records
    assert first.getMessage() == "KV tier 'unreachable' failed in contains; taken as a miss"
    assert first.levelno == logging.WARNING and first.exc_info[0] is ConnectionError
    assert {r.levelno for r in rest} == {logging.DEBUG}
    assert {r.getMessage().split(" failed in ")[0] for r in rest} == {"KV tier 'unreachable'"}


def test_chunks_the_disk_tier_drops_reach_a_shared_tier_below_with_their_kv(tmp_path):
    """disk (room for one chunk file) -> shared: the disk tier reads a file it drops
    only when a tier below needs the data, as here."""
    probe = _Rig(disk=tmp_path / "probe")
    probe.serve(_tokens(20, 4))
    file_bytes = next((tmp_path / "probe").rglob("*.kv")).stat().st_size
    shared = _host(8, SharedHostTier)
    rig = _Rig(disk=tmp_path / "disk", disk_bytes=file_bytes, more_tiers=[shared])
    first, second = _tokens(21, 4), _tokens(22, 4)
    rig.serve(first)  # written through to disk
    rig.serve(second)  # its file pushes the first one out, down to the shared tier
    assert shared.num_used_blocks == 2
    rig.blocks.cache.flush()  # the device forgets both, offloading nothing
    assert rig.serve(first + [1]) == 4  # KV checked: the shared tier got the real data
    assert _failures(rig) == [0, 0]


def test_a_chunk_held_in_part_by_one_tier_is_completed_from_a_lower_one(tmp_path):
    """The host tier holds the first block of a chunk, the disk tier all of it: the
    lower tier is asked for more, and the whole chunk comes back."""
    rig = _Rig(host_chunks=4, disk=tmp_path)
    prompt = _tokens(23, 6)  # a chunk and a block
    rig.serve(prompt)
    _evict_all(rig)  # host and disk: chunk 0, and the first block of chunk 1
    longer = prompt + [7, 8]
    rig.serve(longer)  # chunk 1 whole: written through to disk
    rig.blocks.cache.flush()  # the host tier keeps only the block it had
    assert rig.serve(longer + [1]) == 8
    # host: the onload of ``longer`` (6 tokens), then chunk 0; disk: chunk 1 whole.
    assert [stats.hit_tokens for stats in rig.tiers.tier_stats()] == [6 + 4, 4]


def test_with_only_a_shared_tier_chunks_evicted_for_an_onload_leave_the_engine():
    events = _Events()
    rig = _Rig(num_blocks=8, more_tiers=[_host(8, SharedHostTier)], events=events.events)
    first, second = _tokens(24, 8), _tokens(25, 12)
    rig.serve(first)
    _evict_all(rig)
    rig.serve(second)
    before = len(events.evicted())
    assert rig.serve(first + [1]) == 8  # onloaded into blocks of ``second``
    # The last chunk of ``second`` makes room for the onload (held back for the shared
    # tier, still gone from this engine); the one before it, for the new block.
    chain = _chain(second)
    assert events.evicted()[before:] == [(None, chain[2]), (None, chain[1])]


def test_a_chunk_served_in_part_is_marked_used_in_its_tier():
    """The host tier's least recently used chunk goes first: a chunk an onload served
    only its first block of counts as used by that onload."""
    rig = _Rig(host_chunks=3)
    partial, other = _tokens(26, 6), _tokens(27, 4)  # ``partial``: a chunk and a block
    rig.serve(partial)
    _evict_all(rig)  # host, oldest first: block 4..6 of ``partial``, chunk 0 of it
    rig.serve(other)
    _evict_all(rig)  # ... then ``other``: the host tier is full
    assert rig.serve(partial + [7, 8, 9]) == 6  # chunk 0, and one of the two blocks asked
    rig.blocks.cache.flush()
    rig.serve(_tokens(28, 4))
    _evict_all(rig)  # the host tier drops its least recently used chunk: ``other``
    rig.blocks.cache.flush()
    assert rig.serve(other + [1]) == 0
    assert rig.serve(partial + [7, 8]) == 6
