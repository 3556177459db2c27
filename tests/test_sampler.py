"""Batch sampler: greedy, top-k, top-p, temperature, per-request seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from prefixcache.engine.sampler import Sampler, make_generator
from prefixcache.sampling_params import SamplingParams

GREEDY = SamplingParams()
# Five tokens with probabilities 0.5, 0.3, 0.1, 0.06, 0.04.
FIVE_TOKEN_LOGITS = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()


def _seeded_sampler(seed: int = 0) -> Sampler:
    return Sampler(generator=make_generator(seed, "cpu"))


def _draw_many(logits: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    """Sample ``n`` identical rows in one batch from a seeded default generator."""
    out = _seeded_sampler().sample(logits.expand(n, -1), [params] * n, [None] * n)
    return torch.tensor(out.token_ids)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(6, 100, generator=make_generator(1, "cpu"))
    out = Sampler().sample(logits, [GREEDY] * 6, [None] * 6)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None


def test_greedy_rows_ignore_their_generator_and_sampled_rows_in_the_batch():
    logits = torch.randn(4, 50, generator=make_generator(2, "cpu"))
    params = [GREEDY, SamplingParams(temperature=1.0), GREEDY, SamplingParams(temperature=2.0)]
    generators = [make_generator(3, "cpu"), None, None, make_generator(4, "cpu")]
    out = Sampler().sample(logits, params, generators)
    argmax = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[0], out.token_ids[2]] == [argmax[0], argmax[2]]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_one_equals_greedy(seed):
    logits = torch.randn(8, 200, generator=make_generator(seed, "cpu"))
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    out = _seeded_sampler(seed).sample(logits, params, [None] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_only_the_k_most_likely_tokens():
    tokens = _draw_many(FIVE_TOKEN_LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.93, {0, 1, 2, 3})],
)
def test_top_p_samples_only_the_nucleus(top_p, nucleus):
    tokens = _draw_many(FIVE_TOKEN_LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    assert set(tokens.tolist()) == nucleus


def test_top_p_renormalises_within_the_nucleus():
    tokens = _draw_many(FIVE_TOKEN_LOGITS, SamplingParams(temperature=1.0, top_p=0.75))
    # Nucleus {0, 1} renormalised: P(0) = 0.5 / 0.8 = 0.625; 4000 draws, sd ~ 0.008.
    assert (tokens == 0).float().mean().item() == pytest.approx(0.625, abs=0.04)


def test_top_p_applies_after_top_k():
    # After top_k=3 the mass is 0.9, so token 0 has 0.5 / 0.9 = 0.56 >= 0.55.
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.55)
    assert set(_draw_many(FIVE_TOKEN_LOGITS, params).tolist()) == {0}


def test_unfiltered_sampling_reaches_every_token():
    tokens = _draw_many(FIVE_TOKEN_LOGITS, SamplingParams(temperature=1.0))
    assert set(tokens.tolist()) == {0, 1, 2, 3, 4}


def test_large_temperature_flattens_the_distribution():
    logits = torch.tensor([5.0] + [0.0] * 7)
    cold = _draw_many(logits, SamplingParams(temperature=1.0))
    hot = _draw_many(logits, SamplingParams(temperature=100.0))
    # P(token 0) is 0.955 at temperature 1 and 0.131 at temperature 100.
    assert (cold == 0).float().mean().item() > 0.9
    assert (hot == 0).float().mean().item() < 0.2
    assert torch.bincount(hot, minlength=8).min().item() > 350  # ~500 each


def _run_seeded_request(seed: int, row: int, others: list[SamplingParams]) -> list[int]:
    """Twenty steps of one seeded request placed at ``row`` among ``others``."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    batch = others[:row] + [params] + others[row:]
    generators = [make_generator(p.seed, "cpu") for p in batch]
    sampler = Sampler()
    chosen = []
    for step in range(20):
        logits = torch.randn(len(batch), 64, generator=make_generator(1000 + step, "cpu"))
        logits[row] = torch.randn(64, generator=make_generator(step, "cpu"))
        chosen.append(sampler.sample(logits, batch, generators).token_ids[row])
    return chosen


def test_same_seed_gives_same_tokens_whatever_the_batch():
    others = [
        GREEDY,
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.0, seed=99),
        SamplingParams(temperature=1.3, top_p=0.5, seed=5),
    ]
    alone = _run_seeded_request(7, 0, [])
    assert _run_seeded_request(7, 2, others) == alone
    assert _run_seeded_request(7, 4, others) == alone
    assert _run_seeded_request(7, 1, others[2:]) == alone


def test_different_seeds_give_different_tokens():
    assert _run_seeded_request(7, 0, []) != _run_seeded_request(8, 0, [])


def test_logprobs_are_log_softmax_at_the_chosen_token():
    logits = torch.randn(4, 30, generator=make_generator(5, "cpu"))
    params = [
        SamplingParams(logprobs=True),
        SamplingParams(temperature=0.5, top_k=3, logprobs=True),
        SamplingParams(temperature=2.0, top_p=0.5),
        SamplingParams(temperature=1.0, seed=1, logprobs=True),
    ]
    generators = [make_generator(p.seed, "cpu") for p in params]
    out = _seeded_sampler().sample(logits, params, generators)
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(4), out.token_ids]
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-6)
    assert all(math.isfinite(lp) for lp in out.logprobs)


def test_one_params_and_generator_per_row_is_required():
    with pytest.raises(ValueError, match="3 rows, 2 params"):
        Sampler().sample(torch.zeros(3, 10), [GREEDY] * 2, [None] * 3)


def test_make_generator_is_none_without_seed_and_reproducible_with_one():
    assert make_generator(None, "cpu") is None
    first = torch.rand(5, generator=make_generator(42, "cpu"))
    assert torch.equal(first, torch.rand(5, generator=make_generator(42, "cpu")))
