"""Experts run grouped: one matmul pair per active expert, whatever the token count."""

from __future__ import annotations

import torch

from prefixcache.models import moe
from prefixcache.models.moe import MoeConfig, SparseMoeBlock


def _block(num_experts: int = 4, top_k: int = 2) -> SparseMoeBlock:
    torch.manual_seed(0)
    block = SparseMoeBlock(16, MoeConfig(num_experts, top_k, 8, norm_topk_prob=True))
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return block


def _per_token_reference(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    weights, experts = moe.route(block.gate(x), block.top_k, block.normalize)
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(x.shape[1])
        for w, e in zip(weights[t], experts[t], strict=True):
            gate, up = (block.experts.gate_up_proj[e] @ x[t]).chunk(2)
            out += w * (block.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(out)
    return torch.stack(rows)


def _expert_matmul_rows(monkeypatch, block: SparseMoeBlock, x: torch.Tensor):
    """Run the experts on ``x``; the row count of each matmul they made, and the output."""
    with torch.no_grad():
        weights, experts = moe.route(block.gate(x), block.top_k, block.normalize)
    calls = []
    linear = moe.F.linear
    monkeypatch.setattr(moe.F, "linear", lambda *a: calls.append(a[0].shape[0]) or linear(*a))
    with torch.no_grad():
        out = block.experts(x, experts, weights)
    monkeypatch.undo()
    return calls, out


def test_each_active_expert_runs_one_matmul_pair_for_all_its_tokens(monkeypatch):
    block, x = _block(), torch.randn(300, 16)
    calls, out = _expert_matmul_rows(monkeypatch, block, x)
    assert len(calls) == 2 * 4  # gate/up and down, for each of the 4 experts
    assert sum(calls) == 2 * 300 * 2  # every (token, expert) pair once through each
    with torch.no_grad():
        torch.testing.assert_close(out, _per_token_reference(block, x), rtol=1e-5, atol=1e-5)


def test_a_single_token_runs_only_its_top_k_experts(monkeypatch):
    block, x = _block(num_experts=8, top_k=2), torch.randn(1, 16)
    calls, _ = _expert_matmul_rows(monkeypatch, block, x)
    assert calls == [1, 1, 1, 1]
