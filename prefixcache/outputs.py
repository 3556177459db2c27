"""What the engine hands back: finished results and streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(slots=True)
class RequestOutput:
    """A request's prompt, generated tokens and text, and how much came from the cache."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None

    @property
    def finished(self) -> bool:
        """True once the request stopped for any reason."""
        return self.finish_reason is not None


class RequestTimings(NamedTuple):
    """Where a request's time went inside the engine, in seconds."""

    queued: float  # added -> admitted, lookup excluded
    lookup: float  # prefix-cache match (hashing, walk, locking)
    prefill: float  # admitted -> first token
    decode: float  # first token -> finish


class RequestDelta(NamedTuple):
    """What one engine step added to one request (for streaming)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    timings: RequestTimings | None = None  # on the finishing delta
    # Set on the finishing delta (``finish_reason == "error"``) of a request the engine
    # failed; the request's blocks are already released.
    error: Exception | None = None
    # The chosen tokens' log-probabilities, one per id in ``token_ids`` (None unless
    # the request asked for ``logprobs``).
    logprobs: list[float] | None = None
