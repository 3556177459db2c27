"""Tiers match down to a block, as the device cache does: a prompt that ends inside a
hash chunk comes back from the host tier, or from disk after a restart, up to its last
full block, and so does a prompt that shares only part of a stored chunk."""

from __future__ import annotations

import random

import numpy as np
import pytest
from reference_outputs import memoized_outputs

from prefixcache import Engine, SamplingParams
from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.radix_cache import RadixCache

BLOCK = 16
PARAMS = SamplingParams(max_tokens=6, logprobs=True)
SOURCES = ["host", "disk"]
LOGPROB_TOLERANCE = 1e-4


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


def _full_blocks(num_tokens: int) -> int:
    """Tokens in the whole blocks before a prompt's last token: what a cache can serve."""
    return (num_tokens - 1) // BLOCK * BLOCK


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Cache-off greedy token ids and logprobs, computed once per prompt."""
    return memoized_outputs(_engine(tiny_llama, enable_prefix_caching=False), PARAMS)


def _served_after_moving_off(tiny_llama, tmp_path, source: str, stored, asked):
    """Serve ``stored``, move it off the device (evicted to the host tier, or the engine
    restarted on its disk folder), then serve ``asked``; the engine and that output."""
    if source == "host":
        engine = _engine(tiny_llama, host_cache_tokens=2048)
        first = engine.generate(stored, PARAMS)[0]
        engine.core.blocks.cache.evict(engine.core.blocks.cache.num_evictable_blocks)
        assert engine.core.blocks.cache.num_cached_blocks == 0
    else:
        first = _engine(tiny_llama, disk_cache_dir=tmp_path).generate(stored, PARAMS)[0]
        engine = _engine(tiny_llama, disk_cache_dir=tmp_path)
    asked = asked(first) if callable(asked) else asked
    return engine, asked, engine.generate(asked, PARAMS)[0]


def _check(engine: Engine, source: str, out, expected_cached: int, reference, prompt) -> None:
    assert out.num_cached_tokens == expected_cached
    assert engine.stats()[f"{source}_hit_tokens"] == expected_cached
    token_ids, logprobs = reference(prompt)
    assert out.token_ids == token_ids
    # Equal up to float rounding: the reused KV is split differently from a full prefill.
    assert out.logprobs == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE)
    engine.check_integrity()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("length", [200, 700, 1515])
def test_prompt_ending_inside_a_chunk_comes_back_to_its_last_full_block(
    tiny_llama, tmp_path, reference, source, length
):
    prompt = _prompt(length, length)
    engine, _, out = _served_after_moving_off(tiny_llama, tmp_path, source, prompt, prompt)
    # e.g. 1515 tokens: five whole chunks of 256 and 14 blocks of the sixth, 1504 tokens.
    _check(engine, source, out, _full_blocks(length), reference, prompt)


@pytest.mark.parametrize("source", SOURCES)
def test_next_turn_continues_a_stored_partial_chunk(tiny_llama, tmp_path, reference, source):
    first = _prompt(1, 700)

    def next_turn(out):
        return first + out.token_ids + _prompt(2, 90)

    engine, asked, out = _served_after_moving_off(tiny_llama, tmp_path, source, first, next_turn)
    # Turn one cached every block it computed: its prompt and all outputs but the last.
    _check(engine, source, out, _full_blocks(700 + PARAMS.max_tokens), reference, asked)


@pytest.mark.parametrize("source", SOURCES)
def test_prompt_sharing_part_of_a_stored_chunk_reuses_the_shared_blocks(
    tiny_llama, tmp_path, reference, source
):
    stored = _prompt(3, 1000)
    asked = stored[:600] + _prompt(4, 120)  # diverges inside the third chunk
    engine, _, out = _served_after_moving_off(tiny_llama, tmp_path, source, stored, asked)
    _check(engine, source, out, 600 // BLOCK * BLOCK, reference, asked)


def test_eviction_run_names_the_cached_blocks_before_it():
    pool = BlockPool(32)
    runs = []
    cache = RadixCache(pool, block_size=2, chunk_size=8, on_evict=runs.append)
    tokens = np.arange(1, 21)  # ten blocks: two whole chunks and half of a third
    blocks = pool.allocate(10)
    cache.insert(tokens, blocks)
    cache.evict(1)  # block 9, inside chunk 2
    cache.evict(1)  # block 8, the first of chunk 2
    cache.evict(2)  # blocks 6 and 7, the end of chunk 1
    assert [r.start for r in runs] == [16, 16, 8]
    assert [r.head_block_ids for r in runs] == [blocks[8:9], [], blocks[4:6]]
    assert [r.block_ids for r in runs] == [blocks[9:], blocks[8:9], blocks[6:8]]
    assert all(len(r.token_ids) == 2 * (len(r.head_block_ids) + len(r.block_ids)) for r in runs)
