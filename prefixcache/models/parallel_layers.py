"""Layers split across tensor-parallel ranks (see ``models.parallel``).

Each layer takes its layout from ``parallel.current_parallel()`` when it is built. On
one rank every layer computes exactly what the plain ``nn.Linear`` / ``nn.Embedding``
it replaces does, with the same parameter names and shapes.

A sharded parameter is described by ``ShardRuns`` in its module's ``shard_runs``
(keyed by parameter name): along one dimension, which runs of the whole (fused)
parameter this rank holds and where they sit in its local tensor. The loader reads
exactly those runs from the checkpoint; parameters without runs are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from prefixcache.models.cpu_linear import linear
from prefixcache.models.parallel import TensorParallel, current_parallel


class ShardRuns(NamedTuple):
    """Runs ``(global_start, local_start, length)`` of a parameter along ``dim``."""

    dim: int
    runs: tuple[tuple[int, int, int], ...]


def stacked_runs(dim: int, parts: Sequence[tuple[int, range]]) -> ShardRuns:
    """Runs of fused parts laid one after another: ``parts`` are (the part's offset in
    the whole parameter, this rank's range inside the part)."""
    runs, local = [], 0
    for offset, rows in parts:
        runs.append((offset + rows.start, local, len(rows)))
        local += len(rows)
    return ShardRuns(dim, tuple(runs))


class ColumnParallelLinear(nn.Linear):
    """A linear whose output features are split across ranks; no communication.

    ``parts`` are the fused outputs as (global size, this rank's range of it): one
    part for a plain projection, q/k/v or gate/up for fused ones. The local output is
    this rank's slice of each part, in order, so ``split``/``chunk`` by the local
    part sizes still separates them.
    """

    def __init__(self, in_features: int, parts: Sequence[tuple[int, range]], bias: bool):
        self.parallel = current_parallel()
        self.part_sizes = tuple(len(rows) for _, rows in parts)
        super().__init__(in_features, sum(self.part_sizes), bias=bias)
        offsets = [sum(size for size, _ in parts[:i]) for i in range(len(parts))]
        runs = stacked_runs(0, [(o, rows) for o, (_, rows) in zip(offsets, parts, strict=True)])
        self.shard_runs = {} if self.parallel.size == 1 else {"weight": runs, "bias": runs}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output features of ``x``."""
        return linear(x, self.weight, self.bias)


def merged_column_linear(in_features: int, sizes: Sequence[int], what: str) -> nn.Linear:
    """Column-parallel projections fused side by side (gate and up), no bias."""
    tp = current_parallel()
    parts = [(size, tp.shard_range(size, what)) for size in sizes]
    return ColumnParallelLinear(in_features, parts, bias=False)


def qkv_linear(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool):
    """The fused q/k/v projection: this rank's query heads and the KV heads they use."""
    tp = current_parallel()
    q_heads = tp.shard_range(num_heads, "number of attention heads")
    kv_heads = tp.kv_head_range(num_heads, num_kv_heads)
    q_rows = range(q_heads.start * head_dim, q_heads.stop * head_dim)
    kv_rows = range(kv_heads.start * head_dim, kv_heads.stop * head_dim)
    kv_size = num_kv_heads * head_dim
    parts = [(num_heads * head_dim, q_rows), (kv_size, kv_rows), (kv_size, kv_rows)]
    return ColumnParallelLinear(hidden, parts, bias)


class RowParallelLinear(nn.Linear):
    """A linear whose input features are split across ranks: each rank multiplies its
    slice, then one all-reduce sums the partial outputs (skipped with ``reduce=False``
    when the caller sums several partial outputs first). The bias is replicated and
    added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, reduce: bool = True):
        self.parallel = current_parallel()
        cols = self.parallel.shard_range(in_features, "row-parallel input features")
        super().__init__(len(cols), out_features, bias=bias)
        self.reduce = reduce
        runs = stacked_runs(1, [(0, cols)])
        self.shard_runs = {} if self.parallel.size == 1 else {"weight": runs}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product, summed over ranks, plus the bias."""
        if self.parallel.size == 1:
            return linear(x, self.weight, self.bias)
        out = linear(x, self.weight)
        if self.reduce:
            out = self.parallel.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embeddings split by vocabulary rows, padded to the same count per rank.

    Each rank looks up the ids in its slice (zeros for the others), and one all-reduce
    adds the ranks' rows: exactly one rank contributes each token's row.
    """

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.parallel = current_parallel()
        per, self.rows = self.parallel.padded_range(vocab_size)
        self.weight = nn.Parameter(torch.empty(per, hidden))
        self.shard_runs = {} if self.parallel.size == 1 else {"weight": _vocab_runs(self.rows)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows ``[tokens, hidden]`` of ``input_ids``."""
        if self.parallel.size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.rows.start) & (input_ids < self.rows.stop)
        local = torch.where(mine, input_ids - self.rows.start, 0)
        out = F.embedding(local, self.weight) * mine[:, None].to(self.weight.dtype)
        return self.parallel.all_reduce(out)


class ParallelLMHead(nn.Module):
    """The output projection split by vocabulary rows (the embedding's layout, so the
    two can be tied). Each rank computes its slice of the logits; they are gathered
    on every rank and the padding is trimmed: the result is ``[tokens, vocab_size]``."""

    def __init__(self, hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.parallel = current_parallel()
        self.vocab_size = vocab_size
        per, rows = self.parallel.padded_range(vocab_size)
        self.weight = nn.Parameter(torch.empty(per, hidden))
        self.shard_runs = {} if self.parallel.size == 1 else {"weight": _vocab_runs(rows)}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary, in the weights' dtype."""
        logits = linear(hidden, self.weight)
        if self.parallel.size == 1:
            return logits
        return self.parallel.all_gather_last(logits)[..., : self.vocab_size]


def _vocab_runs(rows: range) -> ShardRuns:
    return ShardRuns(0, ((rows.start, 0, len(rows)),) if len(rows) else ())


def expert_runs(tp: TensorParallel, intermediate: int) -> dict[str, ShardRuns]:
    """Runs of stacked expert weights split on their intermediate dimension: the gate
    and up halves of ``gate_up_proj`` ``[experts, 2 * I, hidden]`` and the columns of
    ``down_proj`` ``[experts, hidden, I]``."""
    if tp.size == 1:
        return {}
    cols = tp.shard_range(intermediate, "moe_intermediate_size")
    gate_up = stacked_runs(1, [(0, cols), (intermediate, cols)])
    return {"gate_up_proj": gate_up, "down_proj": stacked_runs(2, [(0, cols)])}
