"""What rank 0 sends the workers: one pickled message per step or block copy."""

from __future__ import annotations

import pickle
from typing import NamedTuple

from prefixcache.engine.model_runner import SequenceChunk


class StepPlan(NamedTuple):
    """Forward ``chunks`` (all the step's sequences) in every rank's shard."""

    chunks: list[SequenceChunk]
    all_logits: bool


class ReadBlocks(NamedTuple):
    """Gather every rank's shard of ``block_ids`` to rank 0 (an offload to a tier)."""

    block_ids: list[int]


class WriteBlocks(NamedTuple):
    """Receive this rank's shard of ``block_ids`` from rank 0 (a load from a tier)."""

    block_ids: list[int]


class Stop(NamedTuple):
    """Leave the worker loop and exit."""


Message = StepPlan | ReadBlocks | WriteBlocks | Stop


def encode(message: Message) -> bytes:
    """``message`` serialized once, to be sent to every worker."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(payload: bytes) -> Message:
    """A message from rank 0 (only ever read from rank 0's own pipe)."""
    return pickle.loads(payload)
