"""A request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prefixcache.sampling_params import SamplingParams

_FIRST_OUTPUT_ROOM = 256  # output slots reserved up front; more are added by doubling


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Token ids, KV blocks and progress of one request.

    ``block_ids[:num_locked_blocks]`` are borrowed from the prefix cache (protected by
    the lock on ``cache_node``); the rest hold one pool reference owned by this sequence.
    """

    request_id: str
    prompt: np.ndarray  # validated int32 prompt ids
    params: SamplingParams
    arrival: int
    salt: str | None = None
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    # The sliding-window layers' blocks in a hybrid KV cache (``WindowBlocks``).
    local_block_ids: list[int] = field(default_factory=list)
    num_locked_blocks: int = 0
    cache_node: Any = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    skipped: int = 0  # admissions that went to a request queued after this one
    deferred: int = 0  # steps whose short prompts went before this running prefill
    lookup_counted: bool = False  # the cache's hit counters have seen this request
    added_at: float = 0.0  # perf_counter() timestamps, for per-request timings
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    lookup_seconds: float = 0.0
    grammar: Any = None  # a RequestGrammar for a constrained request; moves with its tokens
    num_prompt_tokens: int = field(init=False)
    _array: np.ndarray = field(init=False, repr=False)  # prompt + output, grown by doubling
    _length: int = field(init=False)

    def __post_init__(self) -> None:
        if self.prompt.dtype != np.int32 or self.prompt.ndim != 1:
            raise ValueError("a sequence's prompt must be a 1-d int32 array")
        self.num_prompt_tokens = self._length = len(self.prompt)
        room = min(self.params.max_tokens, _FIRST_OUTPUT_ROOM)
        self._array = np.empty(self._length + room, np.int32)
        self._array[: self._length] = self.prompt

    def append_token(self, token_id: int) -> None:
        """Add a generated token."""
        if self._length == len(self._array):
            grown = np.empty(2 * len(self._array), np.int32)
            grown[: self._length] = self._array
            self._array = grown
        self._array[self._length] = token_id
        self._length += 1

    def token_array(self, length: int | None = None) -> np.ndarray:
        """The first ``length`` token ids (all by default) as an int32 array view.

        The prefix cache compares arrays; a 200k-token prompt never becomes a list.
        """
        return self._array[: self._length if length is None else length]

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids ``[start, stop)`` as a list (a step's new tokens)."""
        return self._array[start : min(stop, self._length)].tolist()

    @property
    def last_token_id(self) -> int:
        """The newest token."""
        return int(self._array[self._length - 1])

    @property
    def token_ids(self) -> list[int]:
        """Prompt plus generated token ids, as a new list."""
        return self._array[: self._length].tolist()

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's token ids, as a new list."""
        return self.prompt.tolist()

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return self._length

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens so far."""
        return self._array[self.num_prompt_tokens : self._length].tolist()

    @property
    def num_output_tokens(self) -> int:
        """How many tokens have been generated."""
        return self._length - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not yet in the cache (the last sampled token during decode)."""
        return self._length - self.num_computed_tokens
