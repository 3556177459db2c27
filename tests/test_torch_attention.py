"""The torch reference backend against dense attention, across its reading strategies."""

from __future__ import annotations

import pytest
import torch

from kernels import AttentionMetadata, torch_ref

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def _dense(q, k, v, first_pos: int, scale: float) -> torch.Tensor:
    """Plain causal attention of queries at ``first_pos..`` over all of ``k``/``v``."""
    group = HEADS // KV_HEADS
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    q_pos = torch.arange(first_pos, first_pos + q.shape[0])[:, None]
    scores.masked_fill_(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def _run(seq_specs, num_blocks: int, scattered: bool, seed: int = 0):
    """seq_specs: (context length, new tokens) per sequence; returns (ours, expected)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, DIM)
    v_cache = torch.zeros_like(k_cache)
    order = torch.randperm(num_blocks, generator=gen).tolist() if scattered else range(num_blocks)
    free = iter(order)
    tables, queries, expected = [], [], []
    for total, new in seq_specs:
        table = [next(free) for _ in range(-(-total // BLOCK))]
        k = torch.randn(total, KV_HEADS, DIM, generator=gen)
        v = torch.randn(total, KV_HEADS, DIM, generator=gen)
        for pos in range(total):
            k_cache[table[pos // BLOCK], pos % BLOCK] = k[pos]
            v_cache[table[pos // BLOCK], pos % BLOCK] = v[pos]
        q = torch.randn(new, HEADS, DIM, generator=gen)
        tables.append(table)
        queries.append(q)
        expected.append(_dense(q, k, v, total - new, 0.3))
    meta = AttentionMetadata.build(
        [new for _, new in seq_specs], [t for t, _ in seq_specs], tables, BLOCK
    )
    ours = torch_ref.TorchReferenceBackend().attend(torch.cat(queries), k_cache, v_cache, meta, 0.3)
    return ours, torch.cat(expected)


@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_prefill_and_decode_match_dense_attention(monkeypatch, scattered, fused):
    monkeypatch.setattr(torch_ref, "KEY_TILE", 12)
    monkeypatch.setattr(torch_ref, "QUERY_TILE", 5)
    monkeypatch.setattr(torch_ref, "BATCHED_DECODE_MAX_LEN", 0)
    if not fused:
        monkeypatch.setattr(torch_ref, "_FUSED_CPU", None)
    ours, expected = _run([(37, 11), (9, 9), (50, 1), (23, 1)], num_blocks=40, scattered=scattered)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_decode_only_steps_match_in_both_paths(monkeypatch):
    specs = [(37, 1), (9, 1), (50, 1)]
    batched, expected = _run(specs, num_blocks=40, scattered=True)
    monkeypatch.setattr(torch_ref, "BATCHED_DECODE_MAX_LEN", 0)
    per_sequence, _ = _run(specs, num_blocks=40, scattered=True)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_sequence, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("long_run", [1, 3, 1000])
def test_views_and_gathers_give_the_same_attention(monkeypatch, long_run):
    monkeypatch.setattr(torch_ref, "LONG_RUN_BLOCKS", long_run)  # 1: all views, 1000: all gathered
    monkeypatch.setattr(torch_ref, "BATCHED_DECODE_MAX_LEN", 0)
    monkeypatch.setattr(torch_ref, "KEY_TILE", 20)
    ours, expected = _run([(45, 7), (30, 1), (61, 1)], num_blocks=40, scattered=True, seed=3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
