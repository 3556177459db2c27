"""Turns that end exactly on a KV block boundary are reused without stale KV.

A finished request's last sampled token has no KV yet (it was never fed back). When
prompt plus output fills its last block exactly, caching that block would hand the
next turn a slot that was never written. Greedy ids can survive such a slot by
luck; logprobs do not, so cache on and cache off are compared on both.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest

from prefixcache import Engine, SamplingParams

BLOCK = 16
NUM_CASES = 40
NUM_TURNS = 3
LOGPROB_TOLERANCE = 1e-4  # float32 reorderings between a cached and a full prefill


class Case(NamedTuple):
    """One conversation: its first prompt and the new tokens each later turn adds."""

    first_prompt: list[int]
    additions: list[list[int]]
    extra_blocks: list[int]  # per turn: whole blocks of output beyond the boundary


def _cases(seed: int) -> list[Case]:
    rng = random.Random(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, 700) for _ in range(rng.randint(lo, hi))]

    return [
        Case(
            first_prompt=tokens(BLOCK + 1, 8 * BLOCK),
            additions=[tokens(1, 2 * BLOCK) for _ in range(NUM_TURNS - 1)],
            extra_blocks=[rng.randint(0, 1) for _ in range(NUM_TURNS)],
        )
        for _ in range(NUM_CASES)
    ]


def _to_boundary(num_prompt: int, extra_blocks: int) -> int:
    """max_tokens that makes prompt plus output a whole number of blocks."""
    return ((-num_prompt) % BLOCK or BLOCK) + BLOCK * extra_blocks


def _play(engine: Engine, cases: list[Case]) -> list[list]:
    """Every conversation turn by turn (batched across cases); each later turn sends the
    previous prompt and its output ids back, then new tokens. Outputs per turn."""
    prompts = [c.first_prompt for c in cases]
    turns = []
    for turn in range(NUM_TURNS):
        params = [
            SamplingParams(
                max_tokens=_to_boundary(len(p), c.extra_blocks[turn]),
                ignore_eos=True,
                logprobs=True,
            )
            for p, c in zip(prompts, cases, strict=True)
        ]
        outputs = engine.generate(prompts, params)
        assert all((len(o.prompt_token_ids) + len(o.token_ids)) % BLOCK == 0 for o in outputs)
        turns.append(outputs)
        if turn + 1 < NUM_TURNS:
            prompts = [
                p + o.token_ids + c.additions[turn]
                for p, o, c in zip(prompts, outputs, cases, strict=True)
            ]
    return turns


def _engine(model, caching: bool) -> Engine:
    return Engine.from_pretrained(
        str(model),
        device="cpu",
        dtype="float32",
        kv_cache_tokens=32768,
        enable_prefix_caching=caching,
    )


@pytest.fixture(scope="module")
def played(tiny_llama):
    cases = _cases(seed=19)
    on, off = _engine(tiny_llama, True), _engine(tiny_llama, False)
    return cases, _play(on, cases), _play(off, cases), on


def test_turns_ending_on_a_block_boundary_match_cache_off_ids_and_logprobs(played):
    _, on, off, _ = played
    for turn, (turn_on, turn_off) in enumerate(zip(on, off, strict=True)):
        for case, (a, b) in enumerate(zip(turn_on, turn_off, strict=True)):
            where = f"case {case}, turn {turn + 1}"
            assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOLERANCE), where
            assert a.token_ids == b.token_ids, where


def test_later_turns_reuse_the_previous_turn_up_to_its_last_block(played):
    cases, on, _, engine = played
    for turn in range(1, NUM_TURNS):
        for before, now in zip(on[turn - 1], on[turn], strict=True):
            previous = len(before.prompt_token_ids) + len(before.token_ids)
            assert now.num_cached_tokens >= previous - BLOCK
    engine.check_integrity()
