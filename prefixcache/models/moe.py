"""Mixture-of-experts feed-forward: top-k routing, experts run grouped, optional shared expert.

The step's (token, expert) pairs are sorted by expert, so each active expert runs one
matmul over all the tokens routed to it, then the weighted outputs are added back to
their tokens with one ``index_add_``. The Python loop is over experts, never tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from prefixcache.models.cpu_linear import linear
from prefixcache.models.layers import GatedMLP
from prefixcache.models.parallel import current_parallel
from prefixcache.models.parallel_layers import expert_runs


@dataclass(frozen=True, slots=True)
class MoeConfig:
    """The expert layout of a mixture-of-experts model."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has experts (else a dense feed-forward)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


def parse_moe(raw: dict[str, Any], architecture: str) -> MoeConfig | None:
    """The experts of a config.json dict, or None for a dense model; ValueError names a field."""
    num_experts = raw.get("num_experts", raw.get("num_local_experts"))
    if not num_experts:
        return None
    moe = MoeConfig(
        num_experts=_count(num_experts, architecture, "num_experts"),
        top_k=_count(raw.get("num_experts_per_tok", 2), architecture, "num_experts_per_tok"),
        intermediate_size=_count(
            raw.get("moe_intermediate_size", raw["intermediate_size"]),
            architecture,
            "moe_intermediate_size",
        ),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=_count(
            raw.get("shared_expert_intermediate_size", 0) or 0,
            architecture,
            "shared_expert_intermediate_size",
            minimum=0,
        ),
        decoder_sparse_step=_count(
            raw.get("decoder_sparse_step", 1), architecture, "decoder_sparse_step"
        ),
        mlp_only_layers=_layers(raw.get("mlp_only_layers") or [], raw, architecture),
    )
    if moe.top_k > moe.num_experts:
        raise ValueError(
            f"{architecture}: num_experts_per_tok ({moe.top_k}) exceeds "
            f"num_experts ({moe.num_experts})"
        )
    return moe


def _layers(value: Any, raw: dict[str, Any], architecture: str) -> tuple[int, ...]:
    num_layers = raw.get("num_hidden_layers", 0)
    ok = isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in value
    )
    if not ok:
        raise ValueError(
            f"{architecture}: mlp_only_layers must list layer indices below "
            f"num_hidden_layers ({num_layers}), got {value!r}"
        )
    return tuple(value)


def _count(value: Any, architecture: str, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{architecture}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def route(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights: softmax in float32, then top-k,
    renormalized to sum to one when ``normalize`` (as the reference models do)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked weights, run grouped by expert.

    Tensor-parallel: each rank holds a slice of every expert's intermediate dimension
    and returns its partial sum (the block all-reduces it).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        tp = current_parallel()
        self.shard_runs = expert_runs(tp, intermediate)
        intermediate = tp.split(intermediate, "moe_intermediate_size")
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    @property
    def num_experts(self) -> int:
        """How many experts the stack holds."""
        return self.gate_up_proj.shape[0]

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
        """Sum over each token's chosen experts of weight * expert(token)."""
        top_k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = order // top_k  # the token of each (token, expert) pair, grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        grouped = x[tokens]
        out = torch.empty_like(grouped)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                gate, up = linear(grouped[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
                out[rows] = linear(F.silu(gate) * up, self.down_proj[expert])
                start += count
        out = out * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, out)


class SparseMoeBlock(nn.Module):
    """Router, grouped experts and, when the model has one, a sigmoid-gated shared expert.

    Tensor-parallel: the router is replicated; the experts and the shared expert give
    partial outputs, summed over ranks by one all-reduce.
    """

    def __init__(self, hidden: int, moe: MoeConfig) -> None:
        super().__init__()
        self.parallel = current_parallel()
        self.top_k, self.normalize = moe.top_k, moe.norm_topk_prob
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)
        self.experts = GroupedExperts(moe.num_experts, hidden, moe.intermediate_size)
        if moe.shared_expert_intermediate_size:
            size = moe.shared_expert_intermediate_size
            self.shared_expert = GatedMLP(hidden, size, reduce=False)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` ``[tokens, hidden]``."""
        weights, experts = route(self.gate(x), self.top_k, self.normalize)
        out = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.parallel.all_reduce(out)


def feed_forward(hidden: int, intermediate: int, moe: MoeConfig | None, layer: int) -> nn.Module:
    """The feed-forward block of decoder layer ``layer``: experts or a dense SwiGLU."""
    if moe is not None and moe.is_sparse(layer):
        return SparseMoeBlock(hidden, moe)
    return GatedMLP(hidden, intermediate)
