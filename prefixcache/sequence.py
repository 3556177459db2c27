"""A request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

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
