"""Host and disk tiers: offload on eviction, onload on a match, reuse across restarts."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

import chunking.hashing
from prefixcache import Engine, SamplingParams
from prefixcache.tiers.base import ChunkQuery
from prefixcache.tiers.chunk_chains import ChunkChains
from prefixcache.tiers.kv_file import decode
from prefixcache.tiers.transfer import _runs

CHUNK = 64  # small hash chunks keep the prompts short
PARAMS = SamplingParams(max_tokens=6)


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 4096)
    kwargs.setdefault("chunk_size", CHUNK)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Cache-off greedy outputs, computed once per prompt."""
    engine = _engine(tiny_llama, enable_prefix_caching=False)
    done: dict[tuple[int, ...], list[int]] = {}

    def outputs(prompts: list[list[int]]) -> list[list[int]]:
        for p in prompts:
            if tuple(p) not in done:
                done[tuple(p)] = engine.generate(p, PARAMS)[0].token_ids
        return [done[tuple(p)] for p in prompts]

    return outputs


def _tier(engine: Engine, name: str):
    return engine.core.blocks.tiers.tier(name)


def _files(engine: Engine) -> list:
    return sorted(_tier(engine, "disk").folder.glob("*.kv"))


def _chains(engine: Engine, prompt: list[int]) -> ChunkChains:
    chains = ChunkChains(engine.limits.fingerprint, None, CHUNK)
    chains.extend_to(np.asarray(prompt, dtype=np.int32))
    return chains


def _query(engine: Engine, prompt: list[int], chunk: int) -> ChunkQuery:
    """The lookup of whole chunk ``chunk`` of ``prompt``."""
    chains, tokens = _chains(engine, prompt), np.asarray(prompt, dtype=np.int32)
    start = chunk * CHUNK
    return ChunkQuery(chains.seed(chunk), chains.parent(chunk), start, tokens[start:][:CHUNK])


def _chunk_file(engine: Engine, prompt: list[int], chunk: int):
    chains = _chains(engine, prompt)
    return _tier(engine, "disk").path(chains.parent(chunk), chains.chunk_hash(chunk))


# -- host tier --------------------------------------------------------------------------


def test_outputs_through_offload_and_onload_equal_cache_off(tiny_llama, reference):
    shared = _prompt(0, 200)
    prompts = [_prompt(s, 300 + 37 * s) for s in range(1, 6)]
    prompts += [shared + _prompt(s, 40 + s) for s in range(6, 9)]
    engine = _engine(tiny_llama, kv_cache_tokens=512, host_cache_tokens=16384)
    first = [engine.generate(p, PARAMS)[0] for p in prompts]  # one at a time: all evicted
    second = engine.generate(prompts, PARAMS)  # all at once: onload, evict, preempt
    expected = reference(prompts)
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    assert all(
        o.num_cached_tokens >= len(p) // CHUNK * CHUNK - CHUNK
        for o, p in zip(second, prompts, strict=True)
    )
    stats = engine.stats()
    assert stats["host_hit_tokens"] > 0 and stats["evicted_blocks"] > 0
    assert stats["offloaded_bytes"] > 0 and stats["onloaded_bytes"] > 0
    assert 0 < stats["host_used_blocks"] <= stats["host_capacity_blocks"]
    engine.check_integrity()


def _play(engine: Engine, conversations: list[list[str]]) -> list[list[int]]:
    """Turn one of every conversation, then turn two of each, ...: by the time a
    conversation continues, its earlier turns have left the device."""
    histories: list[list[dict]] = [[] for _ in conversations]
    outputs = []
    for turn in range(max(map(len, conversations))):
        for history, turns in zip(histories, conversations, strict=True):
            if turn < len(turns):
                history.append({"role": "user", "content": turns[turn]})
                out = engine.chat(history, SamplingParams(max_tokens=10))[0]
                history.append({"role": "assistant", "content": out.text})
                outputs.append(out.token_ids)
    return outputs


def test_conversations_through_all_tiers_equal_cache_off(tiny_llama, tmp_path):
    rng = random.Random(5)
    words = ["cache", "prefix", "token", "block", "radix", "tree", "turn", "héllo", "disk"]
    shared = " ".join(rng.choice(words) for _ in range(60))
    conversations = [
        [
            (shared if rng.random() < 0.5 else "") + " ".join(rng.choices(words, k=40))
            for _ in range(rng.randint(2, 3))
        ]
        for _ in range(12)
    ]
    off = _engine(tiny_llama, kv_cache_tokens=1024, enable_prefix_caching=False)
    on = _engine(
        tiny_llama, kv_cache_tokens=1024, host_cache_tokens=8 * CHUNK, disk_cache_dir=tmp_path
    )
    assert _play(on, conversations) == _play(off, conversations)
    stats = on.stats()
    assert stats["host_hit_tokens"] > 0 and stats["disk_hit_tokens"] > 0
    assert stats["host_evicted_blocks"] > 0
    on.check_integrity()


def test_chunk_evicted_block_by_block_reaches_host_whole(tiny_llama):
    engine = _engine(tiny_llama, host_cache_tokens=4096)
    prompt = _prompt(11, 4 * CHUNK + 5)
    engine.generate(prompt, SamplingParams(max_tokens=1))
    cache = engine.core.blocks.cache
    match = cache.match(np.asarray(prompt[: 4 * CHUNK]))
    k_pool = engine.core.runner.kv_cache.layers[1][0]
    on_device = k_pool[match.block_ids].clone()
    cache.unlock(match.node)
    while cache.evict(1):  # the smallest steps eviction takes: one block at a time
        pass
    host = _tier(engine, "host")
    chains = _chains(engine, prompt)
    nb = CHUNK // 16
    for c in range(4):
        chunk = host.get(_query(engine, prompt, c))
        complete = chunk is not None and len(chunk.tokens) == CHUNK
        assert complete and chunk.parent == chains.parent(c)
        held = chunk.data[1, 0]  # layer 1, K
        assert torch.equal(held, on_device[c * nb : (c + 1) * nb])
    engine.check_integrity()


def test_small_host_tier_evicts_and_stays_correct(tiny_llama, reference):
    prompts = [_prompt(s, 3 * CHUNK + 9) for s in range(20, 26)]
    engine = _engine(tiny_llama, kv_cache_tokens=512, host_cache_tokens=6 * CHUNK)
    for _ in range(2):
        assert [o.token_ids for o in engine.generate(prompts, PARAMS)] == reference(prompts)
    stats = engine.stats()
    assert stats["host_evicted_blocks"] > 0
    assert stats["host_used_blocks"] <= stats["host_capacity_blocks"]
    engine.check_integrity()


def test_colliding_hashes_never_serve_kv_of_another_prefix(tiny_llama, reference, monkeypatch):
    monkeypatch.setattr(chunking.hashing, "_xxh3", lambda data, seed=0: 7)  # every chunk collides
    x, z, y = _prompt(30, CHUNK), _prompt(31, CHUNK), _prompt(32, CHUNK + 20)
    engine = _engine(tiny_llama, host_cache_tokens=4096)
    engine.generate(x + y, PARAMS)
    while engine.core.blocks.cache.evict(1):  # suffix first: y's chunk takes the one hash slot
        pass
    engine.generate(z, SamplingParams(max_tokens=1))  # z on device, y (after x) on host
    held = _tier(engine, "host").get(_query(engine, x + y, 1))
    assert held is not None and held.key == 7 and held.tokens.tolist() == y[:CHUNK]
    out = engine.generate(z + y, PARAMS)[0]
    # Chunk 1 of both prompts has the same tokens and the same (forced) hash chain, but
    # its KV depends on the chunk before: only z, from the device, may be reused.
    assert out.num_cached_tokens == CHUNK
    assert out.token_ids == reference([z + y])[0]
    assert engine.stats()["host_hit_tokens"] == 0
    engine.check_integrity()


# -- disk tier --------------------------------------------------------------------------


def test_second_engine_reuses_prefix_from_disk(tiny_llama, reference, tmp_path):
    prompt = _prompt(40, 4 * CHUNK + 30)
    first = _engine(tiny_llama, disk_cache_dir=str(tmp_path))
    first_out = first.generate(prompt, PARAMS)[0]
    # Four whole chunks written as computed, and the partial fifth when the request ended.
    assert len(_files(first)) == 5 and first.stats()["disk_written_bytes"] > 0
    del first
    second = _engine(tiny_llama, disk_cache_dir=str(tmp_path), host_cache_tokens=1024)
    out = second.generate(prompt, PARAMS)[0]
    reusable = (len(prompt) - 1) // 16 * 16  # every full block before the last token
    assert out.num_cached_tokens == reusable
    assert out.token_ids == first_out.token_ids == reference([prompt])[0]
    stats = second.stats()
    assert stats["disk_hit_tokens"] == reusable and stats["disk_read_bytes"] > 0
    # Blocks read from disk are named like computed ones: evicted, they reach the host.
    second.core.blocks.cache.evict(second.core.blocks.cache.num_evictable_blocks)
    again = second.generate(prompt, PARAMS)[0]
    assert again.token_ids == out.token_ids and second.stats()["host_hit_tokens"] == reusable
    second.check_integrity()


def test_other_model_fingerprint_does_not_reuse_disk(tiny_llama, tiny_model_factory, tmp_path):
    prompt = _prompt(41, 3 * CHUNK + 10)
    _engine(tiny_llama, disk_cache_dir=tmp_path).generate(prompt, PARAMS)
    other = _engine(tiny_model_factory("llama", seed=1), disk_cache_dir=tmp_path)
    out = other.generate(prompt, PARAMS)[0]
    assert out.num_cached_tokens == 0 and other.stats()["disk_hit_tokens"] == 0
    assert len(list(tmp_path.iterdir())) == 2  # one folder per fingerprint


def test_file_of_another_model_is_a_miss_and_removed(
    tiny_llama, tiny_model_factory, tmp_path, caplog
):
    prompt = _prompt(42, 2 * CHUNK + 10)
    mine = _engine(tiny_llama, disk_cache_dir=tmp_path)
    mine.generate(prompt, PARAMS)
    other = _engine(tiny_model_factory("llama", seed=1), disk_cache_dir=tmp_path)
    expected = other.generate(prompt, PARAMS)[0].token_ids
    other = _engine(tiny_model_factory("llama", seed=1), disk_cache_dir=tmp_path)
    target = _chunk_file(other, prompt, 0)
    target.write_bytes(_chunk_file(mine, prompt, 0).read_bytes())  # right name, wrong model
    with caplog.at_level(logging.WARNING, logger="prefixcache.tiers.disk"):
        out = other.generate(prompt, PARAMS)[0]
    assert out.num_cached_tokens == 0 and out.token_ids == expected
    assert "fingerprint" in caplog.text
    # The bad file went; the one there now is the second model's own, written through.
    assert decode(_tier(other, "disk").layout, bytearray(target.read_bytes()))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_file_is_a_miss_and_removed(tiny_llama, reference, tmp_path, caplog, damage):
    prompt = _prompt(43, 3 * CHUNK + 10)
    first = _engine(tiny_llama, disk_cache_dir=tmp_path)
    first.generate(prompt, PARAMS)
    path = _chunk_file(first, prompt, 1)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x40
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(random.Random(0).randbytes(len(raw)))
    else:
        raw = bytearray()
    path.write_bytes(raw)
    second = _engine(tiny_llama, disk_cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="prefixcache.tiers.disk"):
        out = second.generate(prompt, PARAMS)[0]
    assert out.num_cached_tokens == CHUNK  # chunk 0 from disk; the damaged chunk 1 ends it
    assert out.token_ids == reference([prompt])[0]
    assert "discarding" in caplog.text
    assert bytearray(path.read_bytes()) != raw  # removed, then rewritten whole
    decode(_tier(second, "disk").layout, bytearray(path.read_bytes()))
    second.check_integrity()


def test_disk_bound_holds_and_evicts_least_recent(tiny_llama, reference, tmp_path):
    prompts = [_prompt(s, 2 * CHUNK + 3) for s in range(50, 56)]
    probe = _engine(tiny_llama, disk_cache_dir=tmp_path / "probe")
    probe.generate(prompts[0], SamplingParams(max_tokens=1))
    file_size = _files(probe)[0].stat().st_size
    bound = 5 * file_size
    engine = _engine(tiny_llama, disk_cache_dir=tmp_path / "bounded", disk_cache_bytes=bound)
    outs = engine.generate(prompts, PARAMS)
    assert [o.token_ids for o in outs] == reference(prompts)
    stats = engine.stats()
    on_disk = sum(p.stat().st_size for p in _files(engine))
    assert on_disk == stats["disk_used_bytes"] <= bound and stats["disk_evicted_blocks"] > 0
    assert _chunk_file(engine, prompts[-1], 1).exists()  # the newest stays
    assert not _chunk_file(engine, prompts[0], 0).exists()  # the oldest went first
    engine.check_integrity()
    smaller = _engine(
        tiny_llama, disk_cache_dir=tmp_path / "bounded", disk_cache_bytes=2 * file_size
    )
    assert sum(p.stat().st_size for p in _files(smaller)) <= 2 * file_size


def test_disk_only_tier_reuses_within_one_engine(tiny_llama, reference, tmp_path):
    prompts = [_prompt(s, 2 * CHUNK + 7) for s in range(60, 66)]
    engine = _engine(tiny_llama, kv_cache_tokens=256, disk_cache_dir=tmp_path)
    engine.generate(prompts, PARAMS)
    again = engine.generate(prompts, PARAMS)
    assert [o.token_ids for o in again] == reference(prompts)
    assert engine.stats()["disk_hit_tokens"] > 0
    engine.check_integrity()


def test_block_runs_split_where_ids_stop_being_consecutive():
    # The CUDA copies move one run of consecutive host blocks per DMA transfer.
    assert _runs([4, 5, 6, 9, 10, 2]) == [(0, 4, 7), (3, 9, 11), (5, 2, 3)]
    assert _runs([7]) == [(0, 7, 8)]


# -- configuration ----------------------------------------------------------------------


def test_bad_tier_options_are_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="host_cache_tokens"):
        _engine(tiny_llama, host_cache_tokens=CHUNK - 1)
    with pytest.raises(ValueError, match="disk_cache_bytes"):
        _engine(tiny_llama, disk_cache_dir=tmp_path, disk_cache_bytes=0)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="disk_cache_dir"):
        _engine(tiny_llama, disk_cache_dir=blocker)
