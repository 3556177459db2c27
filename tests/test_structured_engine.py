"""Constrained decoding in the engine: outputs follow their grammars in every sampling
mode, through the prefix cache, preemption and jump-forward, and never leak a
grammar's state into another request."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from structured_cases import random_schema

from prefixcache import Engine, SamplingParams
from prefixcache.structured import GrammarError, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
LOGPROB_TOLERANCE = 1e-4
PROMPTS = ["Tell me about a pet.", "Describe an animal, please.", "Another one:"]


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 8192)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return _engine(tiny_llama)


def _params(schema=SCHEMA, **kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", 200)
    return SamplingParams(structured=StructuredOutput.json_schema(schema), **kwargs)


def _valid(out, schema=SCHEMA) -> None:
    assert out.finish_reason == "stop", (out.finish_reason, out.text)
    jsonschema.validate(json.loads(out.text), schema)


@pytest.mark.parametrize(
    "mode",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 7},
        {"temperature": 1.5, "top_k": 20, "seed": 8},
        {"temperature": 0.8, "top_p": 0.5, "seed": 9},
        {"temperature": 1.0, "seed": 10, "jump_forward": True},
    ],
)
def test_json_schema_output_validates_in_every_sampling_mode(engine, mode):
    for out in engine.generate(PROMPTS, _params(**mode)):
        _valid(out)
    engine.check_integrity()


def test_randomized_schemas_all_validate_when_batched_together(engine):
    rng = random.Random(20)
    schemas = [random_schema(rng) for _ in range(12)]
    params = [_params(s, temperature=1.0, seed=i) for i, s in enumerate(schemas)]
    for out, schema in zip(engine.generate(["Data:"] * 12, params), schemas, strict=True):
        _valid(out, schema)


def test_unconstrained_neighbour_is_untouched_by_a_constrained_request(engine):
    """Same prompt (so the same cached prefix) with and without a grammar: the free one
    gives what it gives alone, so no mask or matcher state crossed over."""
    free = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=True)
    alone = engine.generate(PROMPTS[0], free)[0]
    together = engine.generate([PROMPTS[0]] * 2, [_params(), free])
    _valid(together[0])
    assert together[1].token_ids == alone.token_ids
    assert together[1].logprobs == pytest.approx(alone.logprobs, abs=1e-5)  # batch rounding


def test_two_requests_on_one_prefix_each_keep_their_own_grammar(engine):
    choices = StructuredOutput.choice(["alpha", "beta", "gamma"])
    pattern = StructuredOutput.regex(r"[0-9]{3}-[a-z]{2}")
    outs = engine.generate(
        [PROMPTS[1]] * 2,
        [SamplingParams(max_tokens=20, structured=s) for s in (choices, pattern)],
    )
    assert outs[0].text in ("alpha", "beta", "gamma")
    assert len(outs[1].text) == 6 and outs[1].text[3] == "-" and outs[1].text[:3].isdigit()


def test_outputs_and_logprobs_equal_with_prefix_cache_on_and_off(tiny_llama, engine):
    off = _engine(tiny_llama, enable_prefix_caching=False)
    params = _params(temperature=1.0, seed=3, logprobs=True)
    prompts = [PROMPTS[0] * 8, PROMPTS[0] * 8 + " And more."]  # the second hits the first
    for _ in range(2):  # the second round is served from the cache
        cached = engine.generate(prompts, params)
        fresh = off.generate(prompts, params)
        for a, b in zip(cached, fresh, strict=True):
            _valid(a)
            assert a.token_ids == b.token_ids
            # cached K/V is summed over in another order: equal up to float rounding
            assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOLERANCE)
    assert cached[1].num_cached_tokens > 0


@pytest.mark.parametrize("jump_forward", [False, True])
def test_preempted_constrained_requests_give_the_same_output(tiny_llama, engine, jump_forward):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 700) for _ in range(rng.randint(40, 90))] for _ in range(10)]
    params = _params(temperature=1.0, seed=11, jump_forward=jump_forward)
    small = _engine(tiny_llama, kv_cache_tokens=400, max_num_batched_tokens=256)
    ids = [small.add_request(p, params) for p in prompts]
    states = [small.core.requests[i] for i in ids]
    while small.has_unfinished_requests():
        small.step()
    assert sum(s.seq.num_preemptions for s in states) > 0, "the pool was meant to run dry"
    for prompt, state in zip(prompts, states, strict=True):
        alone = engine.generate(prompt, params)[0]
        assert state.output().token_ids == alone.token_ids
        _valid(alone)
    small.check_integrity()


def test_jump_forward_appends_the_forced_tokens_without_sampling_them(engine):
    sampled = []
    sample = engine.core.sampler.sample

    def counting(logits, *args, **kwargs):
        sampled.append(logits.shape[0])
        return sample(logits, *args, **kwargs)

    engine.core.sampler.sample = counting
    try:
        out = engine.generate(PROMPTS[2], _params(jump_forward=True))[0]
    finally:
        engine.core.sampler.sample = sample
    _valid(out)
    assert sum(sampled) < len(out.token_ids)  # '{"name": "' and the like came for free


def test_stop_string_cuts_a_constrained_output(engine):
    out = engine.generate(PROMPTS[0], _params(stop=['"age"']))[0]
    assert out.finish_reason == "stop" and out.text.startswith("{") and '"age"' not in out.text


def test_schema_that_cannot_compile_is_refused_naming_it_and_leaves_no_state(engine):
    before = engine.stats()
    with pytest.raises(GrammarError, match='Unsupported type "frob"'):
        engine.add_request("hello", _params({"type": "frob"}))
    assert not engine.has_unfinished_requests() and engine.stats() == before


def test_equal_constraints_are_compiled_once(engine):
    grammars = engine.core.grammars
    spec = StructuredOutput.json_schema({"type": "object", "properties": {"q": {"enum": [1]}}})
    engine.generate("x", SamplingParams(max_tokens=30, structured=spec))
    misses = grammars.misses
    again = StructuredOutput.json_schema(json.dumps(json.loads(spec.source), indent=2))
    engine.generate("y", SamplingParams(max_tokens=30, structured=again))
    assert again.key == spec.key and grammars.misses == misses


def test_jump_forward_with_logprobs_is_refused():
    with pytest.raises(ValueError, match="jump_forward"):
        _params(jump_forward=True, logprobs=True)
