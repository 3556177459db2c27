"""Tensor parallelism: which rank holds which slice of a model, and the collectives.

A model is split Megatron-style over ``TensorParallel.size`` ranks: the q/k/v and
gate/up projections by output features (column-parallel), o and down by input
features (row-parallel, one all-reduce each), embeddings and the LM head by vocabulary
rows, MoE experts by their intermediate dimension (one all-reduce after the expert
sum). Norms and the MoE router are replicated. The layers live in
``models.parallel_layers``; ``models.loader.load_model(..., parallel=...)`` builds them
and reads each rank's slices straight from the safetensors files.

What the engine side needs:

- Every rank must be in one ``torch.distributed`` group (``gloo`` on CPU, ``nccl`` on
  CUDA) before ``load_model`` is called with ``parallel``.
- Size each rank's KV pools with ``config.for_rank(parallel)``: the same config with
  this rank's query and KV head counts, e.g.
  ``KVCache(config.for_rank(parallel), num_blocks, block_size, dtype, device)``.
  Every rank uses the same block ids in its own pool shard.
- ``model.compute_logits`` returns the full ``[tokens, vocab_size]`` logits on
  **every** rank (the vocabulary slices are all-gathered, padding trimmed), so any
  rank can sample; the engine samples on rank 0.
- Every rank must run the same forward passes in the same order (the collectives
  pair up across ranks).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

if TYPE_CHECKING:
    from prefixcache.models.config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: ``rank`` of ``size``.

    ``group`` is the process group of the collectives; None means the default group.
    """

    rank: int
    size: int
    group: ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in [0, {self.size})")

    def split(self, n: int, what: str) -> int:
        """``n / size``; a ValueError naming ``what`` when ``n`` does not divide."""
        if n % self.size:
            raise ValueError(
                f"{what} ({n}) is not divisible by the tensor-parallel size ({self.size})"
            )
        return n // self.size

    def shard_range(self, n: int, what: str = "dimension") -> range:
        """This rank's even share of ``n`` items (``n`` must divide by the size)."""
        per = self.split(n, what)
        return range(self.rank * per, (self.rank + 1) * per)

    def padded_range(self, n: int) -> tuple[int, range]:
        """Rows per rank (``ceil(n / size)``) and this rank's real rows of ``n``: the
        last ranks may hold fewer real rows, or none, behind zero padding."""
        per = -(-n // self.size)
        start = min(self.rank * per, n)
        return per, range(start, min(start + per, n))

    def heads_per_rank(self, num_heads: int) -> int:
        """Query heads on each rank."""
        return self.split(num_heads, "number of attention heads")

    def kv_heads_per_rank(self, num_kv_heads: int) -> int:
        """KV heads on each rank: a share of them, or one replicated head when there
        are fewer KV heads than ranks."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads, "number of KV heads")
        if self.size % num_kv_heads:
            raise ValueError(
                f"tensor-parallel size ({self.size}) is neither a divisor nor a multiple "
                f"of the number of KV heads ({num_kv_heads})"
            )
        return 1

    def kv_head_range(self, num_heads: int, num_kv_heads: int) -> range:
        """The KV heads this rank keeps: those its query heads attend with."""
        per_rank = self.heads_per_rank(num_heads)
        group = num_heads // num_kv_heads  # query heads per KV head
        start = self.rank * per_rank // group
        return range(start, start + self.kv_heads_per_rank(num_kv_heads))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; a no-op on one rank."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension, on every rank."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel(rank=0, size=1)

_BUILDING: contextvars.ContextVar[TensorParallel] = contextvars.ContextVar(
    "tensor_parallel", default=SINGLE
)


@contextlib.contextmanager
def building_for(parallel: TensorParallel | None) -> Iterator[None]:
    """Build the model layers constructed inside for ``parallel`` (None: one rank).

    Layers read the layout once, at construction, and keep it; a forward pass does not
    depend on this context.
    """
    token = _BUILDING.set(parallel or SINGLE)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def current_parallel() -> TensorParallel:
    """The layout of the model being built (one rank outside ``building_for``)."""
    return _BUILDING.get()


def check_layout(config: ModelConfig, parallel: TensorParallel) -> None:
    """Raise a ValueError naming the sizes when ``config`` cannot be split ``parallel.size``
    ways."""
    parallel.kv_head_range(config.num_heads, config.num_kv_heads)
    moe = config.moe
    if moe is None or not all(moe.is_sparse(i) for i in range(config.num_layers)):
        parallel.split(config.intermediate_size, "intermediate_size")
    if moe is not None:
        parallel.split(moe.intermediate_size, "moe_intermediate_size")
        if moe.shared_expert_intermediate_size:
            size = moe.shared_expert_intermediate_size
            parallel.split(size, "shared_expert_intermediate_size")
