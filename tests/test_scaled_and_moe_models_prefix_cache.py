"""Prefix cache hits equal misses on mixture-of-experts models and scaled RoPE.

Twenty three-turn conversations per model, each later turn sending back the previous
prompt, its output and a few new tokens, half of them sharing a first prompt prefix;
a small KV pool makes the engine evict. Greedy ids and logprobs with the cache on
must equal those with it off. The LongRoPE conversations run past the original
length (32) after their first turn, so KV cached under the short factors is reused by
turns that use the long ones too.
"""

from __future__ import annotations

import random

import pytest
from scaled_moe_variants import VARIANTS, variant_folder

from prefixcache import Engine, SamplingParams

NUM_CONVERSATIONS = 20
NUM_TURNS = 3
LOGPROB_TOLERANCE = 1e-4  # float32 reorderings between a cached and a full prefill
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True)


def _first_prompts(rng: random.Random) -> list[list[int]]:
    shared = [rng.randrange(3, 700) for _ in range(40)]
    prompts = []
    for _ in range(NUM_CONVERSATIONS):
        own = [rng.randrange(3, 700) for _ in range(rng.randint(5, 40))]
        prompts.append(shared + own if rng.random() < 0.5 else own)
    return prompts


def _play(engine: Engine, seed: int) -> list[list[tuple[list[int], list[float]]]]:
    """Every conversation turn by turn, batched across conversations; outputs per turn."""
    rng = random.Random(seed)
    prompts, turns = _first_prompts(rng), []
    for _ in range(NUM_TURNS):
        outputs = engine.generate(prompts, PARAMS)
        turns.append([(o.token_ids, o.logprobs) for o in outputs])
        prompts = [
            p + o.token_ids + [rng.randrange(3, 700) for _ in range(rng.randint(1, 20))]
            for p, o in zip(prompts, outputs, strict=True)
        ]
    return turns


def _engine(folder, caching: bool) -> Engine:
    return Engine.from_pretrained(
        str(folder),
        device="cpu",
        dtype="float32",
        kv_cache_tokens=640,
        enable_prefix_caching=caching,
    )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_twenty_conversations_with_eviction_equal_cache_off(tiny_model_factory, name):
    folder = variant_folder(tiny_model_factory, name)
    on, off = _engine(folder, True), _engine(folder, False)
    played_on, played_off = _play(on, seed=23), _play(off, seed=23)
    for turn, (turn_on, turn_off) in enumerate(zip(played_on, played_off, strict=True)):
        for conv, ((ids_on, lp_on), (ids_off, lp_off)) in enumerate(
            zip(turn_on, turn_off, strict=True)
        ):
            where = f"conversation {conv}, turn {turn + 1}"
            assert ids_on == ids_off, where
            assert lp_on == pytest.approx(lp_off, abs=LOGPROB_TOLERANCE), where
    stats = on.stats()
    assert stats["hit_tokens"] > 0 and stats["evicted_blocks"] > 0
    on.check_integrity()


def _grow(engine: Engine, first: list[int], additions: list[list[int]]):
    """One conversation turn by turn: (output, num_cached_tokens) per turn."""
    prompt, turns = first, []
    for added in [None, *additions]:
        if added is not None:
            prompt = prompt + turns[-1][0].token_ids + added
        out = engine.generate(prompt, PARAMS)[0]
        turns.append((out, out.num_cached_tokens))
    return turns


@pytest.mark.parametrize("name", ["longrope", "phi3-longrope"])
def test_longrope_turn_past_the_original_length_recomputes_short_factor_kv(
    tiny_model_factory, name
):
    folder = variant_folder(tiny_model_factory, name)
    on, off = _engine(folder, True), _engine(folder, False)
    rng = random.Random(5)
    for _ in range(4):
        first = [rng.randrange(3, 700) for _ in range(rng.randint(18, 26))]  # fits in 32
        additions = [[rng.randrange(3, 700) for _ in range(8)] for _ in range(2)]
        turns_on, turns_off = _grow(on, first, additions), _grow(off, first, additions)
        for (a, _), (b, _) in zip(turns_on, turns_off, strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOLERANCE)
        # Turn 2 is past 32 tokens: turn 1's short-factor blocks are not reused; turn 3
        # reuses turn 2's long-factor ones.
        assert [cached for _, cached in turns_on] == [0, 0, 32]


def test_longrope_prefix_past_the_original_length_can_be_pinned_and_reused(tiny_model_factory):
    engine = _engine(variant_folder(tiny_model_factory, "phi3-longrope"), True)
    document = [random.Random(6).randrange(3, 700) for _ in range(50)]
    handle = engine.prewarm(document, pin=True, salt="acme:docs")
    assert handle.pinned and handle.num_cached_tokens == 48
    later = engine.generate(document + [5, 6, 7], PARAMS, salt="acme:docs")[0]
    assert later.num_cached_tokens == 48
    assert engine.unpin(handle)
