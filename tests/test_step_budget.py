"""The adaptive step budget: prefill sized by a step cost model, decode never starved.

Costs are given to the scheduler (a fixed ``StepCostModel``), never measured here, so
every expectation is exact arithmetic on the model's coefficients.
"""

from __future__ import annotations

import numpy as np
import pytest

from prefixcache.cache.block_manager import BlockManager
from prefixcache.config import EngineConfig
from prefixcache.engine.scheduler import MAX_SKIPS, Scheduler
from prefixcache.engine.sequence import Sequence
from prefixcache.engine.step_cost import (
    BASE_STEP_MULTIPLE,
    MIN_PREFILL_TOKENS,
    PREFILL_EVERY,
    StepBudget,
    StepCostModel,
    StepShape,
)
from prefixcache.sampling_params import SamplingParams

BLOCK = 16
MS = 1e-3
# 40 ms a step and 1 ms per token: a 100 ms target leaves room for 60 tokens.
PER_TOKEN = StepCostModel((40 * MS, 1.0 * MS, 0.0))


def _scheduler(cost: StepCostModel | None, target_ms: float | None = 100.0, cap=2048, seqs=256):
    target = target_ms * MS if target_ms is not None else None
    blocks = BlockManager(4096, BLOCK, 4 * BLOCK, "fingerprint", enable_prefix_caching=False)
    return Scheduler(blocks, cap, seqs, budget=StepBudget(cap, target, cost))


def _seq(arrival: int, tokens: int, max_tokens: int = 4) -> Sequence:
    prompt = (np.arange(tokens, dtype=np.int32) + arrival) % 500 + 3
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Sequence(f"r{arrival}", prompt, params, arrival=arrival)


def _step(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    """Schedule and run one step as the core does: advance, sample a token where a
    chunk completes, finish a sequence at its max_tokens."""
    work = scheduler.schedule()
    for s in work:
        completes = s.completes
        s.seq.num_computed_tokens += s.num_tokens
        if completes:
            s.seq.append_token(7)
            if s.seq.num_output_tokens >= s.seq.params.max_tokens:
                scheduler.finish(s.seq)
    return [(s.seq, s.num_tokens) for s in work]


def _decoding(scheduler: Scheduler, count: int, prompt: int = 20) -> list[Sequence]:
    """``count`` sequences past their prompts, each with one token to decode, after
    enough decode-only steps that the next step may carry prefill."""
    seqs = [_seq(i, prompt, max_tokens=10_000) for i in range(count)]
    for seq in seqs:
        scheduler.add(seq)
    while any(not s.num_output_tokens for s in seqs):
        _step(scheduler)
    for _ in range(PREFILL_EVERY - 1):
        _step(scheduler)
    return seqs


def _prefilled(work: list[tuple[Sequence, int]], seq: Sequence) -> int:
    return dict(work).get(seq, 0)


def test_a_lone_prefill_gets_what_the_target_allows():
    scheduler = _scheduler(PER_TOKEN)
    long = _seq(0, 5000)
    scheduler.add(long)
    assert _step(scheduler) == [(long, 60)]


def test_a_step_without_decodes_prefills_up_to_the_whole_target():
    # No stream's inter-token gap is at stake: a lax target is not lowered.
    scheduler = _scheduler(PER_TOKEN, target_ms=1000.0, cap=8192)
    long = _seq(0, 5000)
    scheduler.add(long)
    assert _step(scheduler) == [(long, 1000 - 40)]


def test_beside_decodes_a_lax_target_is_lowered_unless_requests_queue():
    scheduler = _scheduler(PER_TOKEN, target_ms=1000.0, cap=8192)
    _decoding(scheduler, 10)  # 50 ms a decode-only step
    long = _seq(1000, 8000)
    scheduler.add(long)
    # Queued for admission: the whole target, three steps' prefill time at once.
    assert _prefilled(_step(scheduler), long) == pytest.approx(PREFILL_EVERY * 950, abs=1)
    held = [_prefilled(_step(scheduler), long) for _ in range(PREFILL_EVERY - 1)]
    assert held == [0] * (PREFILL_EVERY - 1)
    # Admitted, nothing queued: the limit is a few cheapest steps (one token, 41 ms).
    limit_ms = max(BASE_STEP_MULTIPLE * (40 + 1), 2 * 50)
    expected = PREFILL_EVERY * (limit_ms - 50)
    assert _prefilled(_step(scheduler), long) == pytest.approx(expected, abs=1)


def test_while_streams_decode_prefill_rides_one_step_in_every_three():
    scheduler = _scheduler(PER_TOKEN)
    decoding = _decoding(scheduler, 10)  # 50 ms of decode: the 100 ms target leaves 50
    long = _seq(1000, 5000)
    scheduler.add(long)
    pattern = []
    for _ in range(3 * PREFILL_EVERY):
        work = _step(scheduler)
        assert {s for s, _ in work} >= set(decoding)
        assert all(n == 1 for s, n in work if s in decoding)
        pattern.append(_prefilled(work, long))
    # The prefill of the three steps in one: the other two are decode only.
    assert pattern == ([PREFILL_EVERY * 50] + [0] * (PREFILL_EVERY - 1)) * 3


def test_many_decodes_still_leave_prefill_as_much_time_as_they_take():
    scheduler = _scheduler(PER_TOKEN)
    decoding = _decoding(scheduler, 80)  # 40 + 80 ms: past the 100 ms target alone
    long = _seq(1000, 5000)
    scheduler.add(long)
    work = dict(_step(scheduler))
    assert all(work[s] == 1 for s in decoding)
    # Prefill may take the decodes' 120 ms, for each of three steps (rounding: 359).
    assert work[long] == pytest.approx(PREFILL_EVERY * 120, abs=1)


def test_deep_context_leaves_smaller_chunks_when_attention_costs():
    # 1 ms per million query-key pairs plus 0.1 ms per token, 50 ms a step.
    cost = StepCostModel((50 * MS, 0.1 * MS, 1e-6 * MS))
    budget = StepBudget(8192, 0.1, cost)
    shallow, deep = budget.prefill_room(0, 8192), budget.prefill_room(50_000, 8192)
    assert 0 < deep < shallow
    assert (
        cost.predict(StepShape().plus(50_000, deep))
        <= 0.1
        < cost.predict(StepShape().plus(50_000, deep + 1))
    )


def test_every_decoding_sequence_runs_even_past_the_target():
    # 2 ms per token: 300 decoding sequences alone take 640 ms, past the 100 ms target.
    scheduler = _scheduler(StepCostModel((40 * MS, 2.0 * MS, 0.0)), seqs=512)
    decoding = _decoding(scheduler, 300)
    work = dict(_step(scheduler))
    assert len(work) == 300 and all(work[s] == 1 for s in decoding)


def test_a_prefill_dearer_than_the_target_still_gets_a_floor_chunk():
    scheduler = _scheduler(StepCostModel((0.0, 200 * MS, 0.0)))  # 200 ms a token
    waiting = _seq(0, 3000)
    scheduler.add(waiting)
    assert _step(scheduler) == [(waiting, MIN_PREFILL_TOKENS)]


def test_a_long_prompt_completes_in_chunks_within_the_target():
    scheduler = _scheduler(PER_TOKEN)
    decoding = _decoding(scheduler, 10)
    long = _seq(1000, 2000, max_tokens=1)
    scheduler.add(long)
    steps = 0
    while long.num_output_tokens == 0:
        work = _step(scheduler)
        steps += 1
        # 10 decodes and at most three steps' 50 ms of prefill (100 ms target).
        assert sum(n for _, n in work) <= 10 + PREFILL_EVERY * 50
        assert {s for s, _ in work} >= set(decoding)
    assert long.num_computed_tokens == 2000
    chunks = -(-2000 // (PREFILL_EVERY * 50))
    assert steps == PREFILL_EVERY * (chunks - 1) + 1


def test_no_waiting_request_starves_behind_a_decode_load_past_the_target():
    scheduler = _scheduler(StepCostModel((150 * MS, 1 * MS, 0.0)))  # past the target
    _decoding(scheduler, 30)
    newcomers = [_seq(1000 + i, 300, max_tokens=2) for i in range(5)]
    for seq in newcomers:
        scheduler.add(seq)
    for _ in range(5 * (-(-300 // MIN_PREFILL_TOKENS) + 2)):
        _step(scheduler)
    assert all(seq.num_output_tokens == 2 for seq in newcomers)


def test_without_a_target_the_fixed_budget_decides():
    scheduler = _scheduler(PER_TOKEN, target_ms=None, cap=512)
    long = _seq(0, 5000)
    scheduler.add(long)
    assert _step(scheduler) == [(long, 512)]


def test_the_cap_bounds_the_adaptive_budget():
    scheduler = _scheduler(StepCostModel((40 * MS, 1e-6 * MS, 0.0)), cap=256)
    long = _seq(0, 5000)
    scheduler.add(long)
    assert _step(scheduler) == [(long, 256)]


def test_until_the_model_has_seen_enough_steps_the_cap_decides():
    scheduler = _scheduler(StepCostModel(), cap=300)
    long = _seq(0, 5000)
    scheduler.add(long)
    assert _step(scheduler) == [(long, 300)]


def test_cost_model_recovers_the_costs_of_the_steps_it_saw():
    truth = np.array([2.0 * MS, 0.05 * MS, 2e-6 * MS])
    model, rng = StepCostModel(), np.random.default_rng(0)
    for _ in range(64):
        shape = StepShape().plus(int(rng.integers(0, 4000)), int(rng.integers(1, 2048)))
        for _ in range(int(rng.integers(0, 16))):
            shape = shape.plus(int(rng.integers(0, 4000)), 1)
        seconds = truth @ [1.0, shape.tokens, shape.attended]
        model.observe(shape, float(seconds))
    probe = StepShape().plus(3000, 500).plus(100, 1)
    expected = truth @ [1.0, probe.tokens, probe.attended]
    assert model.predict(probe) == pytest.approx(expected, rel=1e-6)


def test_fitted_costs_are_never_negative():
    model = StepCostModel()
    for tokens in range(1, 200, 10):  # bigger steps measured faster: noise, not a discount
        model.observe(StepShape().plus(0, tokens), 1.0 / tokens)
    assert model.ready
    assert model.predict(StepShape().plus(0, 10_000)) >= model.predict(StepShape().plus(0, 1))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "50", True])
def test_a_bad_step_time_target_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="step_time_target_ms"):
        EngineConfig(model="m", device="cpu", dtype="float32", max_model_len=64,
                     step_time_target_ms=bad)  # fmt: skip


@pytest.mark.parametrize("coefficients", [(0.0, -1.0, 0.0), (0.0, 1.0), (float("nan"),) * 3])
def test_bad_given_costs_are_refused(coefficients):
    with pytest.raises(ValueError, match="coefficients"):
        StepCostModel(coefficients)


def test_taking_more_than_the_step_holds_is_refused():
    budget = StepBudget(64)
    with pytest.raises(ValueError, match="cannot take"):
        budget.take(0, 65, prefill=True)
    with pytest.raises(ValueError, match="cannot take"):
        budget.take(0, -1, prefill=True)


def test_prefill_past_the_target_gets_no_tokens_never_fewer():
    scheduler = _scheduler(PER_TOKEN)
    _decoding(scheduler, 80)  # 40 + 80 ms: decode alone overruns the 100 ms target
    first, second = _seq(1000, 3000), _seq(1001, 3000)
    scheduler.add(first)
    scheduler.add(second)
    work = dict(_step(scheduler))
    assert work[first] >= MIN_PREFILL_TOKENS  # the decodes' time again (above)
    assert second not in work and second in scheduler.waiting
    assert second.num_computed_tokens == 0 and not second.block_ids  # its match given back
    assert min(work.values()) >= 1


def test_a_short_queued_prompt_goes_whole_before_a_long_prompts_next_chunk():
    scheduler = _scheduler(PER_TOKEN)
    long = _seq(0, 5000)
    scheduler.add(long)
    assert _step(scheduler) == [(long, 60)]  # admitted: the first chunk
    short = _seq(1, 20)
    scheduler.add(short)
    # The short prompt whole (20 tokens), the long one what is left of the 60.
    assert _step(scheduler) == [(short, 20), (long, 40)]
    assert short.num_output_tokens == 1


def test_a_queued_prompt_too_long_for_the_step_waits_behind_the_running_one():
    scheduler = _scheduler(PER_TOKEN)
    long = _seq(0, 5000)
    scheduler.add(long)
    _step(scheduler)
    other = _seq(1, 3000)
    scheduler.add(other)
    assert _step(scheduler) == [(long, 60)]
    assert other in scheduler.waiting and other.num_computed_tokens == 0


def test_a_stream_of_short_prompts_cannot_hold_back_a_running_long_prompt():
    scheduler = _scheduler(PER_TOKEN)
    long = _seq(0, 5000)
    scheduler.add(long)
    _step(scheduler)  # admitted: its first chunk
    long_chunks = []
    for arrival in range(1, MAX_SKIPS + 3):
        scheduler.add(_seq(arrival, 60, max_tokens=1))  # each fills a whole step, and ends
        long_chunks.append(dict(_step(scheduler)).get(long, 0))
    assert long_chunks[:MAX_SKIPS] == [0] * MAX_SKIPS
    assert long_chunks[MAX_SKIPS] == 60  # its turn: the whole step, the short one waits
