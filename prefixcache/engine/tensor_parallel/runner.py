"""Rank 0's model runner: each step's plan goes to the workers, then rank 0 runs its
own shard of the same forward and returns the full logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kernels import AttentionBackend
from prefixcache.cache.kv_cache import KVCache
from prefixcache.engine.errors import EngineDeadError
from prefixcache.engine.model_runner import ModelRunner, SequenceChunk
from prefixcache.engine.tensor_parallel.group import WorkerGroup
from prefixcache.engine.tensor_parallel.messages import StepPlan


class TensorParallelRunner(ModelRunner):
    """A ``ModelRunner`` over rank 0's shard that drives the other ranks through
    ``group``. Any failure in a step is the engine's (``EngineDeadError``): the ranks
    can no longer be known to be in step with each other."""

    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        backend: AttentionBackend,
        device: torch.device,
        group: WorkerGroup,
    ) -> None:
        super().__init__(model, kv_cache, backend, device)
        self.group = group

    def run(self, chunks: Sequence[SequenceChunk], all_logits: bool = False) -> torch.Tensor:
        """Send the step's plan to every worker in one message, then forward rank 0's
        shard; the logits of each chunk's last token (or of every token)."""
        self.group.send(StepPlan(list(chunks), all_logits))
        try:
            return super().run(chunks, all_logits)
        except Exception as exc:
            raise self.group.fail(exc) from exc

    def on_failure(self, callback: Callable[[EngineDeadError], None]) -> None:
        """Call ``callback(error)`` when a worker dies (from the group's monitor thread)."""
        self.group.on_failure(callback)

    def close(self) -> None:
        """Stop the workers and leave the process group."""
        self.group.stop()
