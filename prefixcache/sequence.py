"""A request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prefixcache.sampling_params import SamplingParams


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
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int
    salt: str | None = None
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_locked_blocks: int = 0
    cache_node: Any = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    skipped: int = 0  # admissions that went to a request queued after this one
    added_at: float = 0.0  # perf_counter() timestamps, for per-request timings
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    lookup_seconds: float = 0.0
    _array: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32), repr=False)
    _array_len: int = 0

    def adopt_token_array(self, array: np.ndarray) -> None:
        """Start the int32 mirror of ``token_ids`` from an array the caller already has."""
        if len(array) != len(self.token_ids):
            raise ValueError("token array and token ids differ in length")
        self._array, self._array_len = np.ascontiguousarray(array, dtype=np.int32), len(array)

    def token_array(self, length: int | None = None) -> np.ndarray:
        """The first ``length`` token ids as an int32 array, kept in step incrementally.

        The prefix cache compares arrays; converting a 200k-token list on every
        lookup would cost milliseconds, so only newly appended tokens are copied.
        """
        total = len(self.token_ids)
        if self._array_len < total:
            if len(self._array) < total:
                grown = np.empty(max(total, 2 * len(self._array)), np.int32)
                grown[: self._array_len] = self._array[: self._array_len]
                self._array = grown
            self._array[self._array_len : total] = self.token_ids[self._array_len :]
            self._array_len = total
        return self._array[: total if length is None else length]

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens so far."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """How many tokens have been generated."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not yet in the cache (the last sampled token during decode)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """True once a stop condition was met or the request was aborted."""
        return self.status is SequenceStatus.FINISHED
