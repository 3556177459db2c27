"""BlockManager with real host and disk tiers, without a model.

Requests are played as the scheduler plays them (match, allocate, compute, cache,
free). "Computing" a token writes KV that is a hash of the token's whole prefix, so a
block brought back from a tier holding any other prefix's KV, or none, fails
``_assert_kv``: these tests see stale or foreign KV, not only block counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixcache.cache.block_manager import BlockManager
from prefixcache.engine.sequence import Sequence
from prefixcache.sampling_params import SamplingParams
from prefixcache.tiers.disk import DiskTier
from prefixcache.tiers.host import HostTier
from prefixcache.tiers.kv_file import ChunkLayout
from prefixcache.tiers.tiered import TieredCache
from prefixcache.tiers.transfer import KVTransfer

BS, CS = 2, 4  # two blocks per hash chunk
FINGERPRINT = "model-a"
_MOD = 1_000_003  # KV values stay integers that float32 holds exactly
CHUNK_SHAPE = (1, 2, CS // BS, BS, 1, 1)  # a tier chunk: layers, K and V, blocks, block


class _Rig:
    """A device KV pool, the tiers behind it, and the block manager over both."""

    def __init__(
        self,
        num_blocks=16,
        host_chunks=0,
        disk=None,
        caching=True,
        fingerprint=None,
        more_tiers=(),
        events=None,
        disk_bytes=1 << 20,
    ):
        """``more_tiers``: tiers after the host and disk ones; ``events``: a
        ``CacheEvents`` the block manager and the tiers record into."""
        shape = (num_blocks, BS, 1, 1)  # one layer, one head of width one
        self.layers = [(torch.zeros(shape), torch.zeros(shape))]
        tiers = []
        if host_chunks:
            tiers.append(HostTier(host_chunks, CHUNK_SHAPE, torch.float32))
        if disk is not None:
            layout = ChunkLayout(fingerprint or FINGERPRINT, torch.float32, CHUNK_SHAPE)
            tiers.append(DiskTier(disk, layout, disk_bytes))
        tiers += more_tiers
        transfer = KVTransfer(self.layers)
        self.tiers = TieredCache(transfer, BS, CS, tiers, events) if tiers else None
        self.blocks = BlockManager(
            num_blocks, BS, CS, fingerprint or FINGERPRINT, caching, self.tiers, events
        )
        self._served = 0

    def tier(self, name: str):
        return self.tiers.tier(name)

    def start(self, tokens: list[int], salt: str | None = None, outputs: int = 1) -> Sequence:
        """A request looked up and given its blocks; its reused KV is checked."""
        self._served += 1
        prompt = np.asarray(tokens, dtype=np.int32)
        seq = Sequence(f"r{self._served}", prompt, SamplingParams(max_tokens=outputs), 0, salt)
        self.blocks.match_prefix(seq)
        self._assert_kv(seq, seq.num_computed_tokens)
        return seq

    def serve(self, tokens: list[int], salt: str | None = None, outputs=()) -> int:
        """One whole request: prefill, then a decode step per output after the first (the
        last output's KV is never computed). Returns the tokens it reused."""
        seq = self.start(tokens, salt, max(1, len(outputs)))
        reused = seq.num_computed_tokens
        self.compute(seq, seq.num_tokens - reused)
        self.blocks.cache_computed_blocks(seq)
        for i, token in enumerate(outputs):
            seq.append_token(token)
            if i + 1 < len(outputs):
                self.compute(seq, 1)
        self.blocks.free(seq)
        return reused

    def compute(self, seq: Sequence, n: int) -> None:
        """Give ``seq`` blocks for ``n`` more tokens and write their KV."""
        assert self.blocks.allocate(seq, n)
        k, v = self.layers[0]
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block, slot = seq.block_ids[p // BS], p % BS
            k[block, slot], v[block, slot] = _kv(seq.token_array(p + 1))
        seq.num_computed_tokens += n

    def _assert_kv(self, seq: Sequence, num_tokens: int) -> None:
        k, v = self.layers[0]
        for p in range(num_tokens):
            block, slot = seq.block_ids[p // BS], p % BS
            want = _kv(seq.token_array(p + 1))
            assert (k[block, slot].item(), v[block, slot].item()) == want, f"stale KV at {p}"


def _kv(prefix: np.ndarray) -> tuple[float, float]:
    """The KV "computed" for the last token of ``prefix``: a hash of the whole prefix."""
    h = 7
    for t in prefix.tolist():
        h = (h * 131 + t + 1) % _MOD
    return float(h), float(-h)


def _tokens(seed: int, n: int) -> list[int]:
    return [(seed * 37 + i * 11) % 97 + 1 for i in range(n)]


def _evict_all(rig: _Rig) -> None:
    """Move everything cached on the device down to the tiers."""
    rig.blocks.cache.evict(rig.blocks.cache.num_cached_blocks)
    assert rig.blocks.cache.num_cached_blocks == 0


# -- host tier --------------------------------------------------------------------------


def test_evicted_prefix_comes_back_from_host_with_its_own_kv():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(1, 13)  # three whole chunks and a block of the fourth
    assert rig.serve(prompt) == 0
    _evict_all(rig)
    assert rig.tier("host").num_used_blocks == 6  # whole chunks only, from their start
    # The same prompt and more: all 12 tokens of whole chunks come back, KV checked.
    assert rig.serve(prompt + [5, 6, 7]) == 12
    assert rig.tiers.tier_stats()[0].hit_tokens == 12
    rig.blocks.cache.check_integrity()


def test_onloaded_blocks_continue_a_device_match():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(2, 16)
    rig.serve(prompt)
    rig.blocks.cache.evict(4)  # the last two chunks go to the host; the first two stay
    assert rig.blocks.cache.num_cached_blocks == 4
    assert rig.serve(prompt + [1]) == 16


def test_a_request_with_too_little_left_to_onload_stays_on_the_device():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(3, 8)
    rig.serve(prompt)
    _evict_all(rig)
    # One token past a block boundary: nothing whole to bring back beyond the prompt.
    assert rig.serve(prompt[:2]) == 0
    assert rig.serve(prompt[:3]) == 2


def test_onload_is_capped_by_the_blocks_the_device_can_spare():
    rig = _Rig(num_blocks=6, host_chunks=8)
    prompt = _tokens(4, 16)
    seq = rig.start(prompt)
    rig.compute(seq, 12)  # three chunks: the pool is nearly full
    rig.blocks.free(seq)
    _evict_all(rig)
    # Six device blocks, one kept for the tokens to compute: five come back, checked.
    seq = rig.start(prompt[:12] + [9])
    assert seq.num_computed_tokens == 10 and len(seq.block_ids) == 5
    rig.blocks.free(seq, cache_blocks=False)


def test_a_tenant_never_onloads_another_tenants_kv_from_host():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(5, 12)
    rig.serve(prompt, salt="alice:")
    _evict_all(rig)
    assert rig.serve(prompt + [1], salt="bob:") == 0
    assert rig.serve(prompt + [1], salt="alice:x") == 0  # another salt of the same key
    assert rig.serve(prompt + [1], salt=None) == 0
    assert rig.serve(prompt + [1], salt="alice:") == 12


def test_a_request_looked_up_again_counts_its_hits_once():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(6, 8)
    rig.serve(prompt)
    _evict_all(rig)
    seq = rig.start(prompt + [1])
    assert seq.num_computed_tokens == 8
    rig.blocks.free(seq, cache_blocks=False)  # waits for room: looked up again later
    rig.blocks.cache.evict(4)
    device_hits = rig.blocks.cache.stats.hit_tokens
    rig.blocks.match_prefix(seq)
    assert seq.num_computed_tokens == 8
    assert rig.tiers.tier_stats()[0].hit_tokens == 8  # the second onload not counted
    assert rig.blocks.cache.stats.hit_tokens == device_hits
    assert rig.blocks.cache.stats.query_tokens == 7 + 8  # once per request, last token off
    rig.blocks.free(seq)


def test_match_prefix_leaves_a_sequence_that_has_blocks_alone():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(7, 8)
    rig.serve(prompt)
    seq = rig.start(_tokens(8, 9))
    rig.compute(seq, 9)
    blocks = list(seq.block_ids)
    rig.blocks.match_prefix(seq)
    assert seq.block_ids == blocks and seq.num_computed_tokens == 9
    rig.blocks.free(seq)
    rig.blocks.cache.check_integrity()


# -- disk tier: written through, found again after a restart ----------------------------


def test_a_restarted_engine_reuses_every_computed_chunk_from_disk(tmp_path):
    first = _Rig(disk=tmp_path)
    prompt = _tokens(9, 11)  # two whole chunks and a partial third
    first.serve(prompt)  # nothing evicted: written through as computed
    assert first.tier("disk").num_files == 3  # the partial chunk too, once finished
    second = _Rig(disk=tmp_path)
    assert second.serve(prompt + [3]) == 10  # down to the last whole block


def test_chunks_are_written_through_as_they_are_computed_not_only_at_the_end(tmp_path):
    rig = _Rig(disk=tmp_path)
    seq = rig.start(_tokens(10, 14), outputs=2)
    rig.compute(seq, 8)
    rig.blocks.cache_computed_blocks(seq)
    assert rig.tier("disk").num_files == 2  # two whole chunks, while still running
    rig.compute(seq, 2)
    rig.blocks.cache_computed_blocks(seq)
    assert rig.tier("disk").num_files == 2  # a partial chunk waits for the end
    rig.compute(seq, 4)
    rig.blocks.cache_computed_blocks(seq)
    assert rig.tier("disk").num_files == 3
    rig.blocks.free(seq)  # finished: its partial last chunk is written too
    assert rig.tier("disk").num_files == 4


def test_a_reply_ending_on_a_block_boundary_stores_only_computed_kv(tmp_path):
    # Turn one ends on a block boundary: its last output's KV was never computed.
    rig = _Rig(disk=tmp_path)
    prompt = _tokens(11, 9)
    outputs = [40, 41, 42, 43, 44]  # 14 tokens, 13 with KV
    rig.serve(prompt, outputs=outputs)
    restarted = _Rig(disk=tmp_path)
    # The next turn sends the outputs back: 12 tokens reused, each checked.
    assert restarted.serve(prompt + outputs + [1, 2]) == 12


def test_a_tenant_never_reads_another_tenants_chunks_after_a_restart(tmp_path):
    _Rig(disk=tmp_path).serve(_tokens(12, 12), salt="alice:")
    rig = _Rig(disk=tmp_path)
    assert rig.serve(_tokens(12, 12) + [1], salt="bob:") == 0
    assert rig.serve(_tokens(12, 12) + [1], salt=None) == 0
    assert rig.serve(_tokens(12, 12) + [1], salt="alice:") == 12


def test_another_model_never_reads_the_chunks_on_disk(tmp_path):
    _Rig(disk=tmp_path).serve(_tokens(13, 12))
    assert _Rig(disk=tmp_path, fingerprint="model-b").serve(_tokens(13, 12) + [1]) == 0


def test_host_evictions_reach_disk_and_come_back(tmp_path):
    rig = _Rig(host_chunks=1, disk=tmp_path)
    prompt = _tokens(14, 12)
    rig.serve(prompt)
    _evict_all(rig)
    assert rig.serve(prompt + [2]) == 12
    assert sum(s.hit_tokens for s in rig.tiers.tier_stats()) == 12


# -- without tiers, or without prefix caching -------------------------------------------


def test_without_prefix_caching_the_tiers_are_never_used(tmp_path):
    rig = _Rig(host_chunks=8, disk=tmp_path, caching=False)
    assert rig.blocks.cache is None and rig.blocks.tiers is None
    prompt = _tokens(15, 12)
    assert rig.serve(prompt) == 0 and rig.serve(prompt + [1]) == 0
    assert rig.tier("disk").num_files == 0 and rig.tier("host").num_used_blocks == 0
    assert rig.blocks.cached_prefix_tokens(rig.start(prompt)) == 0
    assert rig.blocks.pool.num_free == 16


def test_without_tiers_a_cached_prefix_is_reused_and_peeked_without_locking():
    rig = _Rig()
    prompt = _tokens(16, 12)
    rig.serve(prompt)
    seq = Sequence("peek", np.asarray(prompt + [1], np.int32), SamplingParams(), 0)
    assert rig.blocks.cached_prefix_tokens(seq) == 12
    assert rig.blocks.cache.num_locked_blocks == 0
    assert rig.serve(prompt + [1]) == 12


# -- taking blocks ----------------------------------------------------------------------


def test_allocation_evicts_only_the_blocks_it_lacks():
    rig = _Rig(num_blocks=8)
    rig.serve(_tokens(17, 8))  # four cached blocks, four free
    seq = rig.start(_tokens(18, 10))
    assert rig.blocks.allocate(seq, 10)  # five blocks: one evicted
    assert rig.blocks.cache.num_cached_blocks == 3 and rig.blocks.pool.num_free == 0
    rig.blocks.free(seq, cache_blocks=False)


def test_allocation_that_cannot_fit_changes_nothing():
    rig = _Rig(num_blocks=8)
    rig.serve(_tokens(19, 8))
    seq = rig.start(_tokens(20, 40))
    assert not rig.blocks.allocate(seq, 18)
    assert seq.block_ids == []
    assert rig.blocks.allocate(seq, 16)  # exactly the whole pool, evicting all four
    assert rig.blocks.pool.num_free == 0 and rig.blocks.allocate(seq, 0)
    rig.blocks.free(seq, cache_blocks=False)
    assert rig.blocks.pool.num_free == 8


def test_free_returns_every_block_and_resets_the_sequence(tmp_path):
    rig = _Rig(disk=tmp_path)
    seq = rig.start(_tokens(21, 10))
    rig.compute(seq, 10)
    rig.blocks.free(seq)
    assert seq.block_ids == [] and seq.num_locked_blocks == 0 and seq.cache_node is None
    assert rig.blocks.cache.num_locked_blocks == 0
    assert rig.blocks.num_available_blocks == 16
    rig.blocks.cache.check_integrity()


@pytest.mark.parametrize("cache_blocks", [True, False])
def test_free_caches_computed_blocks_only_when_asked(cache_blocks):
    rig = _Rig()
    seq = rig.start(_tokens(22, 10))
    rig.compute(seq, 10)
    rig.blocks.free(seq, cache_blocks=cache_blocks)
    assert rig.blocks.cache.num_cached_blocks == (5 if cache_blocks else 0)


# -- tenants on the device, and what scheduling peeks at --------------------------------


def test_a_tenant_never_reuses_another_tenants_device_blocks():
    rig = _Rig()
    prompt = _tokens(23, 12)
    rig.serve(prompt)  # unsalted
    assert rig.serve(prompt + [1], salt="bob:") == 0
    seq = Sequence("peek", np.asarray(prompt + [1], np.int32), SamplingParams(), 0, "carol:")
    assert rig.blocks.cached_prefix_tokens(seq) == 0
    assert rig.serve(prompt + [1], salt="bob:") == 12


def test_kv_onloaded_for_a_tenant_stays_in_that_tenants_tree():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(24, 12)
    rig.serve(prompt, salt="alice:")
    _evict_all(rig)
    assert rig.serve(prompt + [1], salt="alice:") == 12  # back on the device
    assert rig.serve(prompt + [1]) == 0  # the unsalted tree never got it
    assert rig.serve(prompt + [1], salt="alice:") == 12


def test_the_cached_prefix_peek_leaves_out_the_last_token():
    rig = _Rig()
    prompt = _tokens(25, 12)
    rig.serve(prompt)
    same = Sequence("same", np.asarray(prompt, np.int32), SamplingParams(), 0)
    assert rig.blocks.cached_prefix_tokens(same) == 10  # the last token is computed again


def test_a_request_that_reused_a_prefix_leaves_no_lock_or_state_behind():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(26, 8)
    rig.serve(prompt)
    assert rig.serve(prompt + [1, 2, 3]) == 8
    assert rig.blocks.cache.num_locked_blocks == 0
    assert not rig.blocks._chunks  # no chunk names kept for finished requests
    rig.blocks.cache.check_integrity()


def test_a_block_manager_caches_prefixes_unless_told_not_to():
    assert BlockManager(8, BS, CS, FINGERPRINT).cache is not None


# -- the last block or two --------------------------------------------------------------


def test_the_last_spare_block_is_onloaded():
    rig = _Rig(num_blocks=6, host_chunks=8)
    prompt = _tokens(27, 12)
    seq = rig.start(prompt)
    rig.compute(seq, 12)
    rig.blocks.free(seq)
    _evict_all(rig)
    holder = rig.start(_tokens(28, 7))
    rig.compute(holder, 7)  # four blocks held: two left, one of them to spare
    seq = rig.start(prompt[:4] + [9])
    assert seq.num_computed_tokens == 2 and len(seq.block_ids) == 1
    rig.blocks.free(seq, cache_blocks=False)
    rig.blocks.free(holder, cache_blocks=False)


def test_one_whole_block_past_the_device_match_is_onloaded():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(29, 4)  # one chunk
    rig.serve(prompt + [7])
    rig.blocks.cache.evict(1)  # the chunk's second block: the chunk goes to host whole
    assert rig.blocks.cache.num_cached_blocks == 1
    assert rig.serve(prompt + [8]) == 4  # block 0 on the device, block 1 from the host


def test_a_chunk_left_partial_by_eviction_is_offloaded_and_comes_back():
    rig = _Rig(host_chunks=8)
    prompt = _tokens(30, 11)  # five whole blocks: two chunks and half of a third
    rig.serve(prompt)
    _evict_all(rig)
    assert rig.tier("host").num_used_blocks == 5
    assert rig.serve(prompt + [1]) == 10


# -- reserving a prompt's blocks at once ------------------------------------------------


@pytest.mark.parametrize(
    ("num_blocks", "prompt_blocks", "reserved"),
    [(64, 55, True), (64, 56, False), (65, 56, True)],
)
def test_a_prompt_is_reserved_while_an_eighth_of_the_pool_stays_free(
    num_blocks, prompt_blocks, reserved
):
    # ``prompt_blocks`` full blocks and 8 outputs: one more block when reserved at once.
    manager = BlockManager(num_blocks, BS, CS, FINGERPRINT)
    prompt = np.arange(1, prompt_blocks * BS + 1, dtype=np.int32)
    seq = Sequence("a", prompt, SamplingParams(max_tokens=2), 0)
    assert manager.allocate(seq, BS)
    assert len(seq.block_ids) == (prompt_blocks + 1 if reserved else 1)


def test_a_prompt_after_a_cached_prefix_reserves_only_its_own_blocks():
    rig = _Rig(num_blocks=64)
    prompt = _tokens(31, 16)
    rig.serve(prompt)  # eight cached blocks
    seq = rig.start(prompt + _tokens(32, 20), outputs=4)
    assert seq.num_locked_blocks == 8
    assert rig.blocks.allocate(seq, 20)
    assert len(seq.block_ids) == rig.blocks.blocks_for(36 + 4)
    rig.blocks.free(seq, cache_blocks=False)


def test_a_later_chunk_never_reserves_even_when_room_appeared():
    manager = BlockManager(64, BS, CS, FINGERPRINT)
    other = Sequence("b", np.arange(1, 21, dtype=np.int32), SamplingParams(max_tokens=1), 0)
    assert manager.allocate(other, 20)  # ten blocks held
    seq = Sequence("a", np.arange(100, 200, dtype=np.int32), SamplingParams(max_tokens=2), 0)
    assert manager.allocate(seq, BS) and len(seq.block_ids) == 1  # 51 wanted: too few free
    seq.num_computed_tokens = BS
    manager.free(other, cache_blocks=False)
    assert manager.allocate(seq, BS) and len(seq.block_ids) == 2  # chunk by chunk still
