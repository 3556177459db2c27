"""Per-request sampling settings, validated once at construction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefixcache.structured.spec import StructuredOutput

_GREEDY_BELOW = 1e-5  # temperatures under this sample as greedy (as vLLM does)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes a sampled request reproducible whatever else is batched
    with it. ``stop`` strings end generation and are not part of the returned text.
    ``structured`` constrains the output to a grammar (a JSON schema, a regex, ...);
    with ``jump_forward`` the tokens the grammar forces are appended without sampling
    (they have no log-probs, so it cannot be combined with ``logprobs``).
    """

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    structured: StructuredOutput | None = None
    jump_forward: bool = False

    def __post_init__(self) -> None:
        self._validate()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (a single string counts as one)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def _validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got {self.structured!r}")
        if self.jump_forward and (self.structured is None or self.logprobs):
            raise ValueError("jump_forward needs a structured constraint and no logprobs")
        for t in self.stop_token_ids or ():
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken: a temperature this close to
        0 would overflow the scaled logits to inf (and NaN probabilities)."""
        return self.temperature < _GREEDY_BELOW
