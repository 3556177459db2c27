"""A prompt's blocks are taken together, so attention reads its context as one run."""

from __future__ import annotations

import numpy as np

from prefixcache.cache.block_manager import RESERVED_OUTPUT_TOKENS, BlockManager
from prefixcache.engine.sequence import Sequence
from prefixcache.sampling_params import SamplingParams

BLOCK = 16


def _manager(num_blocks: int) -> BlockManager:
    return BlockManager(num_blocks, BLOCK, 4 * BLOCK, "fingerprint")


def _sequence(name: str, tokens: int, max_tokens: int = 8) -> Sequence:
    prompt = np.arange(1, tokens + 1, dtype=np.int32) + 1000 * len(name)
    return Sequence(name, prompt, SamplingParams(max_tokens=max_tokens), arrival=0)


def _prefill_in_chunks(manager: BlockManager, seqs: list[Sequence], chunk: int) -> None:
    """Interleave the sequences' chunks, as the scheduler does with a token budget."""
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
        for seq in seqs:
            todo = min(chunk, seq.num_prompt_tokens - seq.num_computed_tokens)
            if todo:
                assert manager.allocate(seq, todo)
                seq.num_computed_tokens += todo


def _is_one_run(block_ids: list[int]) -> bool:
    return block_ids == list(range(block_ids[0], block_ids[0] + len(block_ids)))


def test_interleaved_chunked_prefills_still_get_consecutive_blocks():
    manager = _manager(1024)
    seqs = [_sequence(name, 40 * BLOCK + 5) for name in ("a", "bb", "ccc")]
    _prefill_in_chunks(manager, seqs, chunk=3 * BLOCK)
    for seq in seqs:
        assert _is_one_run(seq.block_ids)
        assert len(seq.block_ids) == manager.blocks_for(seq.num_tokens + 8)  # + its outputs


def test_output_slots_reserved_are_capped():
    manager = _manager(1024)
    seq = _sequence("a", 4 * BLOCK, max_tokens=100_000)
    assert manager.allocate(seq, BLOCK)
    assert len(seq.block_ids) == manager.blocks_for(4 * BLOCK + RESERVED_OUTPUT_TOKENS)


def test_no_reservation_when_it_would_leave_the_pool_short():
    manager = _manager(64)
    seq = _sequence("a", 60 * BLOCK)
    assert manager.allocate(seq, BLOCK)
    assert len(seq.block_ids) == 1  # only what the chunk needs
    manager.free(seq, cache_blocks=False)
    assert manager.pool.num_free == 64
