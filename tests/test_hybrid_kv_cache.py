"""The hybrid KV cache: sliding-window layers keep only their windows, and the prefix
cache stays exact (hit equals miss) although it forgets their older blocks."""

from __future__ import annotations

import pytest
import torch
from test_engine_prefix_cache import _conversations

from prefixcache import Engine, SamplingParams
from prefixcache.cache.block_pool import BlockPool
from prefixcache.cache.kv_cache import hybrid_kv_bytes
from prefixcache.cache.window_blocks import WindowBlocks
from prefixcache.models.config import ModelConfig

LOGPROB_TOLERANCE = 1e-4  # float32 reorderings between a cached and a full prefill
PARAMS = SamplingParams(max_tokens=10, logprobs=True)


def _engine(folder, **kwargs) -> Engine:
    options = {"kv_cache_tokens": 1024, "max_num_batched_tokens": 64, **kwargs}
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **options)


@pytest.fixture(scope="module")
def gemma3(tiny_model_factory):
    return tiny_model_factory("gemma3_text")


def _play_rounds(engine, conversations):
    """Turn r of every conversation runs in one batch, so requests share steps, evict
    each other's blocks and get preempted."""
    histories = [[] for _ in conversations]
    transcripts = [[] for _ in conversations]
    for r in range(max(len(turns) for turns in conversations)):
        live = [i for i, turns in enumerate(conversations) if r < len(turns)]
        batch = [histories[i] + [{"role": "user", "content": conversations[i][r]}] for i in live]
        for i, messages, out in zip(live, batch, engine.chat(batch, PARAMS), strict=True):
            transcripts[i].append(out)
            histories[i] = messages + [{"role": "assistant", "content": out.text}]
    return transcripts


# 24 window blocks: the window pool forgets while the global pool (64 blocks) evicts.
# 64: it never needs to forget, so blocks the global pool evicts must be forgotten.
@pytest.mark.parametrize("window_tokens", [384, 1024])
def test_twenty_conversations_with_eviction_equal_cache_off(gemma3, window_tokens):
    conversations = _conversations(seed=5, count=20)
    on = _engine(gemma3, hybrid_kv_cache=True, window_kv_cache_tokens=window_tokens)
    off = _engine(gemma3, enable_prefix_caching=False, hybrid_kv_cache=False)
    assert on.core.runner.kv_cache.hybrid and not off.core.runner.kv_cache.hybrid
    played_on, played_off = _play_rounds(on, conversations), _play_rounds(off, conversations)
    for turns_on, turns_off in zip(played_on, played_off, strict=True):
        for a, b in zip(turns_on, turns_off, strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOLERANCE)
    stats = on.stats()
    assert stats["hit_tokens"] > 0 and stats["evicted_blocks"] > 0
    assert (on.core.blocks.window.num_forgotten > 0) == (window_tokens < 1024)
    assert sum(t.num_cached_tokens for turns in played_on for t in turns[1:]) > 0
    on.check_integrity()


def test_window_layers_hold_only_their_window_while_a_long_prompt_runs(gemma3):
    engine = _engine(gemma3, hybrid_kv_cache=True, window_kv_cache_tokens=160)
    window = engine.core.blocks.window
    held = []

    model = engine.core.runner.model
    forward = model.forward

    def observed(input_ids, positions, ctx):
        held.append(window.pool.num_blocks - window.pool.num_free)
        return forward(input_ids, positions, ctx)

    model.forward = observed
    prompt = list(range(5, 5 + 600))  # 600 tokens: 38 blocks in the global layers
    out = engine.generate(prompt, SamplingParams(max_tokens=20, logprobs=True))[0]
    reference = _engine(gemma3, hybrid_kv_cache=False, enable_prefix_caching=False)
    expected = reference.generate(prompt, SamplingParams(max_tokens=20, logprobs=True))[0]
    assert out.token_ids == expected.token_ids
    assert out.logprobs == pytest.approx(expected.logprobs, abs=LOGPROB_TOLERANCE)
    # A 64-token step with a 24-token window reads at most 6 blocks; the tree may
    # remember a few more, but never the whole context.
    assert max(held) <= 10 < -(-600 // 16)
    engine.check_integrity()


def test_a_match_is_cut_back_to_where_the_window_layers_have_their_keys():
    window = WindowBlocks(num_blocks=16, block_size=4, window=6)
    global_ids = [100 + j for j in range(8)]
    assert window.reusable_blocks(global_ids) == 0  # nothing remembered
    window._local_of.update({g: j for j, g in enumerate(global_ids)})
    window.pool.allocate(8)
    assert window.reusable_blocks(global_ids) == 8
    # A query at position 32 reads 27..31: blocks 6 and 7. Without block 6, the last
    # point whose window is whole is 24 (reads 19..23: blocks 4 and 5).
    window.forget([106])
    assert window.reusable_blocks(global_ids) == 6
    window.forget([104])  # point 24 reads block 4 too; point 20 reads 15..19: 3, 4
    assert window.reusable_blocks(global_ids) == 4
    window.forget([101])  # point 16 reads 11..15: blocks 2 and 3, still there
    assert window.reusable_blocks(global_ids) == 4


def test_a_forgotten_block_stays_with_the_sequence_that_holds_it():
    class Seq:
        request_id, num_computed_tokens, local_block_ids = "s", 0, []

    window, seq = WindowBlocks(num_blocks=6, block_size=4, window=5), Seq()
    assert window.allocate(seq, 12)  # three blocks
    window.remember(seq, [7, 8, 9])
    window.forget([7, 8, 9])  # the tree lets go; the sequence still holds them
    assert window.pool.num_free == 3
    window.check_integrity([seq], BlockPool(10))
    seq.num_computed_tokens = 12
    window.release_behind(seq)  # the next query (12) reads 8..12: blocks 2 and 3
    assert seq.local_block_ids[:2] == [-1, -1] and window.pool.num_free == 5
    window.free(seq)
    assert window.pool.num_free == 6
    window.check_integrity([], BlockPool(10))


def test_the_tree_forgets_local_blocks_when_it_drops_their_global_block():
    pool, window = BlockPool(4), WindowBlocks(num_blocks=4, block_size=4, window=5)
    pool.on_release = window.forget

    class Seq:
        request_id, num_computed_tokens, local_block_ids = "s", 0, []

    seq = Seq()
    global_ids = pool.allocate(2)
    window.allocate(seq, 8)
    window.remember(seq, global_ids)
    window.free(seq)
    assert window.num_remembered == 2 and window.pool.num_free == 2
    pool.free(global_ids[:1])
    assert window.num_remembered == 1 and window.pool.num_free == 3


def test_gemma3_shape_needs_far_less_kv_per_token_with_the_hybrid_cache():
    config = ModelConfig.from_dict(GEMMA3_27B)
    assert len(config.sliding_layers) == 52
    in_flight = 1024 + 2048 + 16  # window, a step's chunk and the block being written
    for context in (128 * 1024, 200_000):
        full = hybrid_kv_bytes(config, BF16, context, context)
        hybrid = hybrid_kv_bytes(config, BF16, context, in_flight)
        assert full / hybrid >= 3


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"hybrid_kv_cache": True, "host_cache_tokens": 256}, "hybrid_kv_cache"),
        ({"hybrid_kv_cache": "yes"}, "hybrid_kv_cache"),
        ({"window_kv_cache_tokens": 8}, "window_kv_cache_tokens"),
        ({"window_kv_cache_tokens": 48}, "window_kv_cache_tokens"),  # < window + a step
    ],
)
def test_bad_hybrid_options_name_the_field(gemma3, options, field):
    with pytest.raises(ValueError, match=field):
        _engine(gemma3, **options)


def test_hybrid_cache_on_a_model_without_windows_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="hybrid_kv_cache"):
        _engine(tiny_llama, hybrid_kv_cache=True)


BF16 = torch.bfloat16
GEMMA3_27B = {
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 262208,
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "num_hidden_layers": 62,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "sliding_window": 1024,
    "max_position_embeddings": 131072,
    "query_pre_attn_scalar": 168,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}
