"""The adaptive step budget cuts prefills differently, never the outputs."""

from __future__ import annotations

import random

import pytest

from prefixcache import Engine, SamplingParams
from prefixcache.engine.step_cost import PREFILL_EVERY, StepCostModel

LOGPROB_TOLERANCE = 1e-4  # float32 reorderings between one prefill chunking and another
TARGET_MS = 48.0
PER_TOKEN_MS = 1.0  # given costs, 20 ms a step: 28 tokens a step, decodes included


def _engine(folder, **options) -> Engine:
    return Engine.from_pretrained(
        str(folder), device="cpu", dtype="float32", kv_cache_tokens=8192, **options
    )


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams):
    """Outputs of ``prompts`` sent together, and the tokens of each step."""
    steps, run = [], engine.core.runner.run

    def recording_run(chunks, **kwargs):
        steps.append(sum(len(c.token_ids) for c in chunks))
        return run(chunks, **kwargs)

    engine.core.runner.run = recording_run
    return engine.generate(prompts, params), steps


def test_adaptive_chunks_give_the_outputs_and_logprobs_of_a_fixed_budget(tiny_llama):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 700) for _ in range(rng.randint(60, 300))] for _ in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    fixed = _engine(tiny_llama, step_time_target_ms=0, max_num_batched_tokens=2048)
    adaptive = _engine(tiny_llama, step_time_target_ms=TARGET_MS)
    adaptive.core.scheduler.budget.cost = StepCostModel((0.02, PER_TOKEN_MS / 1000, 0.0))
    fixed_out, fixed_steps = _run(fixed, prompts, params)
    adaptive_out, adaptive_steps = _run(adaptive, prompts, params)
    assert max(fixed_steps) > 1000  # the fixed budget prefills every prompt in one step
    # The adaptive one cuts them: to the target, or beside decodes to the prefill time
    # of PREFILL_EVERY steps in one (1 ms a token, so at most that many tokens).
    assert max(adaptive_steps) <= PREFILL_EVERY * TARGET_MS < max(map(len, prompts))
    for a, b in zip(fixed_out, adaptive_out, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOLERANCE)
    adaptive.check_integrity()


def test_the_engine_fits_its_cost_model_to_its_own_steps(tiny_llama):
    engine = _engine(tiny_llama, step_time_target_ms=1000.0)
    rng = random.Random(6)
    prompts = [[rng.randrange(3, 700) for _ in range(rng.randint(20, 400))] for _ in range(12)]
    budget = engine.core.scheduler.budget
    assert not budget.adaptive  # a fresh engine runs the cap until it has seen steps
    engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    assert budget.cost.ready and budget.adaptive
