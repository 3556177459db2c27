"""Continuous batching: concurrency, chunked prefill, preemption, abort, stop strings."""

from __future__ import annotations

import random

import pytest

from prefixcache import Engine, SamplingParams


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 8192)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


def _random_prompts(count: int, seed: int, low: int = 3, high: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 700) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _drain(engine: Engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_sixty_four_concurrent_requests_equal_each_alone(tiny_llama):
    engine = _engine(tiny_llama, max_num_batched_tokens=512)
    prompts = _random_prompts(64, seed=1)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    together = engine.generate(prompts, params)
    alone = _engine(tiny_llama, enable_prefix_caching=False)
    for prompt, out in zip(prompts, together, strict=True):
        assert alone.generate(prompt, params)[0].token_ids == out.token_ids
    engine.check_integrity()


def test_preemption_keeps_outputs_and_leaks_nothing(tiny_llama):
    prompts = _random_prompts(12, seed=2, low=40, high=90)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    small = _engine(tiny_llama, kv_cache_tokens=320, max_num_batched_tokens=256)
    roomy = _engine(tiny_llama)
    ids = [small.add_request(p, params) for p in prompts]
    states = [small.core.requests[i] for i in ids]
    _drain(small)
    assert sum(s.seq.num_preemptions for s in states) > 0, "the pool was meant to run dry"
    for prompt, state in zip(prompts, states, strict=True):
        assert state.output().token_ids == roomy.generate(prompt, params)[0].token_ids
    small.check_integrity()
    assert small.core.blocks.cache.num_locked_blocks == 0


def test_twenty_thousand_token_prompt_under_a_small_budget(tiny_llama):
    prompt = _random_prompts(1, seed=3, low=20000, high=20000)[0]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    small = _engine(tiny_llama, kv_cache_tokens=24576, max_num_batched_tokens=512)
    large = _engine(tiny_llama, kv_cache_tokens=24576, max_num_batched_tokens=32768)
    step_sizes = []
    run = small.core.runner.run

    def recording_run(chunks, **kwargs):
        step_sizes.append(sum(len(c.token_ids) for c in chunks))
        return run(chunks, **kwargs)

    small.core.runner.run = recording_run
    request = small.add_request(prompt, params)
    _drain(small)
    assert max(step_sizes) <= 512 and len(step_sizes) >= 20000 // 512
    state_out = small.generate(prompt, params)[0]  # now mostly a cache hit
    assert state_out.num_cached_tokens >= 19984
    assert state_out.token_ids == large.generate(prompt, params)[0].token_ids
    assert request not in small.core.requests


@pytest.mark.parametrize("stage", ["waiting", "prefill", "decode"])
def test_abort_in_every_state_frees_everything(tiny_llama, stage):
    engine = _engine(tiny_llama, max_num_batched_tokens=64, max_num_seqs=1)
    long_prompt = _random_prompts(1, seed=4, low=300, high=300)[0]
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    blocker = engine.add_request(long_prompt, params)
    victim = engine.add_request(long_prompt[:200], params)
    target = {"waiting": victim, "prefill": blocker, "decode": blocker}[stage]
    engine.step()  # blocker is mid-prefill, victim waits behind max_num_seqs=1
    if stage == "decode":
        while engine.core.requests[blocker].seq.num_output_tokens < 3:
            engine.step()
    delta = engine.abort(target)
    assert delta.finish_reason == "abort" and target not in engine.core.requests
    _drain(engine)
    engine.check_integrity()
    assert engine.core.blocks.cache.num_locked_blocks == 0
    assert engine.stats()["free_blocks"] + engine.stats()["cached_blocks"] == 512


def test_stop_string_across_token_boundary(tiny_llama):
    engine = _engine(tiny_llama)
    free = engine.generate("once upon a time", SamplingParams(max_tokens=30, ignore_eos=True))[0]
    pieces = [engine.tokenizer.decode([t]) for t in free.token_ids]
    boundary = next(i for i in range(3, len(pieces)) if len(pieces[i - 1]) >= 2 and pieces[i])
    stop = pieces[boundary - 1][-2:] + pieces[boundary][:1]
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])
    out = engine.generate("once upon a time", params)[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    assert stop not in out.text


def test_request_that_never_fits_is_refused_and_others_continue(tiny_llama):
    engine = _engine(tiny_llama, kv_cache_tokens=512, max_model_len=4096)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = engine.add_request([5] * 50, params)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        engine.add_request([6] * 600, params)
    states = engine.core.requests[first]
    _drain(engine)
    assert len(states.output().token_ids) == 8
    engine.check_integrity()


def test_prefix_is_shared_while_its_first_request_still_prefills(tiny_llama):
    engine = _engine(tiny_llama, max_num_batched_tokens=128)
    shared = _random_prompts(1, seed=5, low=600, high=600)[0]
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    first = engine.add_request(shared + [1], params)
    for _ in range(3):  # three budget-sized chunks of the first prompt are computed
        engine.step()
    assert engine.core.requests[first].seq.num_computed_tokens < len(shared)
    peek = engine.core.blocks.cache.match(shared + [2])
    engine.core.blocks.cache.unlock(peek.node)
    assert peek.num_tokens == 3 * 128
    second = engine.add_request(shared + [2], params)
    state = engine.core.requests[second]
    _drain(engine)
    assert state.seq.num_cached_tokens >= 3 * 128
    assert first not in engine.core.requests
    engine.check_integrity()


def test_admission_prefers_cached_prefixes_without_starving_others(tiny_llama):
    engine = _engine(tiny_llama, max_num_seqs=1, max_num_batched_tokens=4096)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    warm = _random_prompts(1, seed=6, low=200, high=200)[0]
    engine.generate(warm, params)
    cold = engine.add_request(_random_prompts(1, seed=7, low=50, high=50)[0], params)
    hit = engine.add_request(warm + [9, 9], params)
    assert _finish_order(engine) == [hit, cold]

    starving = engine.add_request(_random_prompts(1, seed=8, low=50, high=50)[0], params)
    for _ in range(40):
        engine.add_request(warm + [7], params)
    assert _finish_order(engine).index(starving) <= 17
    engine.check_integrity()


def _finish_order(engine: Engine) -> list[str]:
    finished = []
    while engine.has_unfinished_requests():
        finished += [d.request_id for d in engine.step() if d.finish_reason]
    return finished
