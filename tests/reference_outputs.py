"""Cache-off outputs to compare cached runs against, computed once per prompt."""

from __future__ import annotations

from collections.abc import Callable

from prefixcache import Engine, SamplingParams

Output = tuple[list[int], list[float]]


def memoized_outputs(engine: Engine, params: SamplingParams) -> Callable[[list[int]], Output]:
    """``prompt -> (token ids, logprobs)`` on ``engine`` (meant to run with the cache
    off), each prompt generated once."""
    done: dict[tuple[int, ...], Output] = {}

    def output(prompt: list[int]) -> Output:
        if tuple(prompt) not in done:
            out = engine.generate(prompt, params)[0]
            done[tuple(prompt)] = (out.token_ids, out.logprobs)
        return done[tuple(prompt)]

    return output
