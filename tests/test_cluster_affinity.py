"""The prefix-affinity policy and the cache-event window, without Ray."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prefixcache import Engine, SamplingParams
from prefixcache.cache.events import ChunkEvent
from prefixcache.cluster.affinity import AffinityIndex
from prefixcache.cluster.events import CacheEventLog, EventCursor
from prefixcache.cluster.stats import merge_stats

CHUNK = 4


def _index(threshold: int = 2, **kw) -> AffinityIndex:
    index = AffinityIndex("fp", CHUNK, imbalance_threshold=threshold, rng=random.Random(0), **kw)
    index.set_replicas(["a", "b", "c"])
    return index


def _prompt(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


def test_longest_cached_match_wins():
    index = _index()
    long_prompt = _prompt(5 * CHUNK)
    index.stored("a", index.key(long_prompt[: 2 * CHUNK], None))
    index.stored("b", index.key(long_prompt[: 4 * CHUNK], None))
    choice = index.choose(index.key(long_prompt, None), {"a": 0, "b": 1, "c": 0})
    assert (choice.replica, choice.matched_chunks, choice.reason) == ("b", 4, "affinity")


def test_a_gap_in_the_chain_ends_the_match():
    """Chunk hashes are chained: holding a later chunk alone (a different prefix) is
    no match for the chunks after the first miss."""
    index = _index()
    hashes = index.key(_prompt(3 * CHUNK), None)
    index.stored("a", [hashes[0], hashes[2]])
    assert index.matched_chunks("a", hashes) == 1


def test_another_tenants_chains_never_match():
    index = _index()
    prompt = _prompt(4 * CHUNK)
    index.stored("a", index.key(prompt, "tenant-1"))
    assert index.key(prompt, "tenant-1") != index.key(prompt, "tenant-2")
    assert index.matched_chunks("a", index.key(prompt, "tenant-2")) == 0
    assert index.matched_chunks("a", index.key(prompt, None)) == 0
    assert index.matched_chunks("a", index.key(prompt, "tenant-1")) == 4


def test_a_too_long_queue_loses_to_the_shortest():
    index = _index(threshold=2)
    hashes = index.key(_prompt(2 * CHUNK), None)
    index.stored("a", hashes)
    assert index.choose(hashes, {"a": 2, "b": 0, "c": 1}).replica == "a"  # 2 - 0 <= 2
    choice = index.choose(hashes, {"a": 3, "b": 0, "c": 1})
    assert (choice.replica, choice.reason) == ("b", "imbalanced")


def test_ties_in_match_go_to_the_shorter_queue():
    index = _index()
    hashes = index.key(_prompt(2 * CHUNK), None)
    index.stored("a", hashes)
    index.stored("c", hashes)
    assert index.choose(hashes, {"a": 2, "b": 0, "c": 1}).replica == "c"


def test_no_match_takes_the_shorter_queue_of_two_random_replicas():
    index = _index()
    hashes = index.key(_prompt(2 * CHUNK), None)
    picks = {index.choose(hashes, {"a": 0, "b": 5, "c": 9}).replica for _ in range(50)}
    # "c" is never picked: it loses to whichever replica it is sampled with. "b" wins
    # when sampled with "c" alone, so both others show up.
    assert picks == {"a", "b"}
    assert index.choose(hashes, {"a": 0, "b": 5, "c": 9}).reason == "balance"


def test_an_eviction_stops_attracting_traffic():
    index = _index(threshold=100)
    hashes = index.key(_prompt(3 * CHUNK), None)
    index.stored("a", hashes)
    index.stored("b", hashes[:1])
    assert index.choose(hashes, {"a": 0, "b": 0, "c": 0}).replica == "a"
    index.evicted("a", hashes[1:])  # suffix first, as the cache evicts
    index.evicted("a", hashes[:1])
    choice = index.choose(hashes, {"a": 0, "b": 0, "c": 0})
    assert (choice.replica, choice.matched_chunks) == ("b", 1)


def test_only_known_replicas_are_tracked_and_a_bound_drops_the_oldest():
    index = _index(max_chains=3)
    index.stored("gone", [1, 2])
    assert index.held("gone") == 0
    index.stored("a", [1, 2, 3, 4])
    assert index.held("a") == 3 and index.matched_chunks("a", [1]) == 0
    index.set_replicas(["a"])
    assert index.replicas == ["a"]


def test_bad_options_and_no_replica_are_refused():
    with pytest.raises(ValueError, match="chunk_size"):
        AffinityIndex("fp", 0)
    with pytest.raises(ValueError, match="imbalance_threshold"):
        AffinityIndex("fp", 4, imbalance_threshold=-1)
    with pytest.raises(ValueError, match="fingerprint"):
        AffinityIndex("", 4)
    with pytest.raises(ValueError, match="no replica"):
        _index().choose([1], {})


def _events(kind: str, *hashes: int) -> list[ChunkEvent]:
    return [ChunkEvent(kind, None, hashes)]


def test_a_router_applies_each_event_once_across_overlapping_reports():
    log, cursor, index = CacheEventLog(), EventCursor(), _index()
    log.add(_events("stored", 1, 2, 3))
    assert cursor.apply(index, "a", log.report()) == 1
    log.add(_events("evicted", 3))
    log.add(_events("stored", 9))
    assert cursor.apply(index, "a", log.report()) == 2  # the first event is not re-applied
    assert index.matched_chunks("a", [1, 2, 3]) == 2 and index.matched_chunks("a", [9]) == 1


def test_a_router_that_missed_events_forgets_the_replica():
    """Past the window an eviction may have been missed: nothing believed may stay."""
    log, cursor, index = CacheEventLog(window_hashes=2), EventCursor(), _index()
    log.add(_events("stored", 1, 2))
    cursor.apply(index, "a", log.report())
    index.stored("a", [7])  # learned from routing
    log.add(_events("evicted", 2))
    log.add(_events("stored", 5, 6))  # pushes the eviction out of the window
    report = log.report()
    assert [seq for seq, _, _ in report["events"]] == [2]
    cursor.apply(index, "a", report)
    assert index.matched_chunks("a", [1]) == 0 and index.matched_chunks("a", [7]) == 0
    assert index.matched_chunks("a", [5, 6]) == 2


def test_a_restarted_log_is_read_from_its_start():
    cursor, index = EventCursor(), _index()
    first = CacheEventLog()
    first.add(_events("stored", 1))
    first.add(_events("stored", 2))
    cursor.apply(index, "a", first.report())
    second = CacheEventLog()
    second.add(_events("stored", 3))
    assert cursor.apply(index, "a", second.report()) == 1
    assert index.matched_chunks("a", [3]) == 1


def test_the_index_keys_prompts_exactly_as_an_engine_caches_them(tiny_llama):
    """The chains a real engine reports storing are the ones the router computes for
    the same prompt and salt (and not for another salt)."""
    engine = Engine.from_pretrained(tiny_llama, device="cpu", chunk_size=32, max_model_len=512)
    stored: list[int] = []
    engine.core.subscribe_cache_events(
        lambda events: stored.extend(
            h for e in events if e.kind == "stored" for h in e.chunk_hashes
        )
    )
    prompt = list(range(5, 5 + 100))
    engine.generate([prompt], SamplingParams(max_tokens=1), salt="t:1")
    index = AffinityIndex(engine.limits.fingerprint, engine.limits.chunk_size)
    assert stored[:3] == index.key(prompt, "t:1")
    assert not set(index.key(prompt, "t:2")) & set(stored)


def test_merged_stats_sum_the_replicas(tiny_llama):
    engine = Engine.from_pretrained(tiny_llama, device="cpu", max_model_len=256)
    engine.generate([list(range(5, 60))], SamplingParams(max_tokens=2))
    one = engine.core.snapshot()
    both = merge_stats([one, one])
    assert both.query_tokens == 2 * one.query_tokens > 0
    assert both.device.total == 2 * one.device.total
    assert both.tiers[0].hit_tokens == 2 * one.tiers[0].hit_tokens
    assert both.block_size == one.block_size
    with pytest.raises(ValueError, match="no replica"):
        merge_stats([])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "0"], "num_replicas must be a positive integer"),
        (["--ray-address", "auto"], "--ray-address needs --replicas"),
        (["--replicas", "2", "--replica-cpus", "-1"], "replica_cpus must be >= 0"),
    ],
)
def test_serve_refuses_bad_cluster_flags_before_starting_anything(flags, message, capsys):
    from prefixcache.cli import main

    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err
