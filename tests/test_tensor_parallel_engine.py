"""A tensor-parallel engine (TP=2 over ``gloo``) against one rank on the same weights.

The model has one KV head (fewer than the ranks: each rank keeps a replica) and an
odd vocabulary (251 rows: the last rank holds a padding row). One TP=2 engine serves
the whole module, with a disk tier; the TP=1 engine is the reference.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from prefixcache import Engine, SamplingParams
from prefixcache.config import EngineConfig
from prefixcache.engine.model_runner import SequenceChunk

LOGPROB_TOLERANCE = 1e-4  # float32 sums split over ranks, or over a cached prefix
KV1_ODD_VOCAB = {
    "num_key_value_heads": 1,
    "vocab_size": 251,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
OPTIONS = {"device": "cpu", "kv_cache_tokens": 2048, "tensor_parallel_timeout_s": 120.0}
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True)


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", **KV1_ODD_VOCAB)


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tp-disk")


@pytest.fixture(scope="module")
def tp2(model: Path, disk_dir: Path):
    with Engine.from_pretrained(
        str(model), tensor_parallel_size=2, disk_cache_dir=str(disk_dir), **OPTIONS
    ) as engine:
        yield engine


@pytest.fixture(scope="module")
def tp1(model: Path):
    with Engine.from_pretrained(str(model), **OPTIONS) as engine:
        yield engine


def _prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 251, (length,), generator=generator).tolist()


def _forward_twice(engine: Engine) -> torch.Tensor:
    """Every logit of a batched prefill of two sequences, then of one decode step of
    both, written to the same free blocks of either engine's pool."""
    a, b = _prompt(1, 30), _prompt(2, 13)
    tables = [[120, 121, 122], [125]]
    prefill = engine.core.runner.run(
        [SequenceChunk(a, 0, tables[0]), SequenceChunk(b, 0, tables[1])], all_logits=True
    )
    decode = engine.core.runner.run(
        [SequenceChunk([7], 30, tables[0]), SequenceChunk([9], 13, tables[1])], all_logits=True
    )
    return torch.cat([prefill, decode])


def test_tp2_logits_match_tp1_on_the_same_weights(tp1: Engine, tp2: Engine):
    # Rank 0 holds half the vocabulary (126 of 251 rows, one padding row on rank 1).
    assert tp2.core.runner.model.lm_head.weight.shape[0] == 126
    assert tp1.core.runner.model.lm_head.weight.shape[0] == 251
    expected, got = _forward_twice(tp1), _forward_twice(tp2)
    assert got.shape == expected.shape == (30 + 13 + 2, 251)
    assert torch.allclose(got, expected, atol=LOGPROB_TOLERANCE, rtol=0), (
        (got - expected).abs().max()
    )


def test_tp2_greedy_output_and_logprobs_match_tp1(tp1: Engine, tp2: Engine):
    prompts = [_prompt(3, 40), _prompt(4, 7), _prompt(5, 70)]
    expected = tp1.generate(prompts, GREEDY, salt="greedy")
    got = tp2.generate(prompts, GREEDY, salt="greedy")
    for a, b in zip(expected, got, strict=True):
        assert b.token_ids == a.token_ids
        assert b.logprobs == pytest.approx(a.logprobs, abs=LOGPROB_TOLERANCE)
    tp2.check_integrity()


def test_tp2_conversation_turns_reusing_the_cache_equal_recomputed_turns(tp2: Engine):
    conversation = _prompt(7, 37)
    for turn in range(3):
        hit = tp2.generate([conversation], GREEDY, salt="conversation")[0]
        miss = tp2.generate([conversation], GREEDY, salt=f"conversation-miss-{turn}")[0]
        assert miss.num_cached_tokens == 0
        if turn:
            assert hit.num_cached_tokens > 0  # the earlier turns' KV, on every rank
        assert hit.token_ids == miss.token_ids
        assert hit.logprobs == pytest.approx(miss.logprobs, abs=LOGPROB_TOLERANCE)
        conversation = conversation + hit.token_ids + _prompt(8 + turn, 21)  # the next turn
    tp2.check_integrity()


def test_disk_tier_written_at_tp2_is_read_back_at_tp2_and_never_at_tp1(
    model: Path, disk_dir: Path, tp2: Engine, tp1: Engine
):
    prompt = _prompt(6, 100)
    first = tp2.generate([prompt], GREEDY, salt="disk")[0]
    tp2.flush_cache()  # only the disk tier holds the prompt's KV now
    before = tp2.stats()["disk_hit_tokens"]
    again = tp2.generate([prompt], GREEDY, salt="disk")[0]
    assert tp2.stats()["disk_hit_tokens"] - before == again.num_cached_tokens == 96
    assert again.token_ids == first.token_ids
    assert again.logprobs == pytest.approx(first.logprobs, abs=LOGPROB_TOLERANCE)

    assert tp1.limits.fingerprint != tp2.limits.fingerprint
    with Engine.from_pretrained(str(model), disk_cache_dir=str(disk_dir), **OPTIONS) as one:
        assert one.limits.fingerprint == tp1.limits.fingerprint
        out = one.generate([prompt], GREEDY, salt="disk")[0]
        assert out.num_cached_tokens == 0 and one.stats()["disk_hit_tokens"] == 0
        assert out.token_ids == first.token_ids


def test_a_layout_the_model_cannot_take_is_refused_before_any_worker_starts(model: Path):
    before = multiprocessing.active_children()
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible .* \(3\)"):
        Engine.from_pretrained(str(model), tensor_parallel_size=3, **OPTIONS)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        Engine.from_pretrained(str(model), tensor_parallel_size=0, **OPTIONS)
    assert multiprocessing.active_children() == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tensor_parallel_size": True}, "tensor_parallel_size must be a positive integer"),
        ({"tensor_parallel_timeout_s": 0}, "tensor_parallel_timeout_s must be > 0"),
        ({"tensor_parallel_size": 2, "device": "cuda:1"}, r"ranks use cuda:0 \.\. cuda:1"),
        ({"tensor_parallel_size": 2, "device": "mps"}, "runs on cpu or cuda devices"),
    ],
)
def test_bad_tensor_parallel_settings_are_named(options: dict, message: str):
    settings = {"model": "m", "device": "cpu", "dtype": "float32", "max_model_len": 64}
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{**settings, **options})
