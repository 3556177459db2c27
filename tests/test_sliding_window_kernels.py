"""Sliding-window and soft-capped attention in the torch reference and the C decode kernel.

Each case is checked against dense attention written out here, and the blocks wholly
before every query's window are replaced by a block of NaNs: a backend that reads
them (a hybrid KV cache may have handed them to another sequence) returns NaNs.
The Triton kernels get the same cases in ``test_triton_kernels.py``.
"""

from __future__ import annotations

import pytest
import torch

import kernels.torch_ref as torch_ref
from kernels import AttentionMetadata
from kernels.cpu_native import decode_attention, paged_decode_window


def dense(q, k, v, first_pos: int, scale: float, window: int | None, softcap: float | None):
    """Causal attention of queries at ``first_pos..`` over all of ``k``/``v``, written out."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q.double(), k.double()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(first_pos, first_pos + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= k_pos <= q_pos - window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v.double()).float()


def windowed_case(specs, heads, kv_heads, dim, block, window, softcap, seed=0, scale=0.3):
    """Pools, a step's metadata, queries and the dense expectation.

    ``specs``: (context length, new tokens) per sequence. Table entries of blocks no
    query of the step can see point at block 0, which holds NaNs.
    """
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 1 + sum(-(-total // block) for total, _ in specs)
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    k_cache[0], v_cache[0] = float("nan"), float("nan")
    order = iter((torch.randperm(num_blocks - 1, generator=gen) + 1).tolist())
    tables, queries, expected = [], [], []
    for total, new in specs:
        table = [next(order) for _ in range(-(-total // block))]
        k = torch.stack([k_cache[table[p // block], p % block] for p in range(total)])
        v = torch.stack([v_cache[table[p // block], p % block] for p in range(total)])
        q = torch.randn(new, heads, dim, generator=gen)
        expected.append(dense(q, k, v, total - new, scale, window, softcap))
        first_seen = 0 if window is None else max(0, total - new - window + 1)
        tables.append([0 if (i + 1) * block <= first_seen else b for i, b in enumerate(table)])
        queries.append(q)
    meta = AttentionMetadata.build([n for _, n in specs], [t for t, _ in specs], tables, block)
    return torch.cat(queries), k_cache, v_cache, meta, torch.cat(expected)


WINDOWS = [(5, None), (16, None), (37, None), (None, 2.0), (7, 1.5), (1, None)]


@pytest.mark.parametrize(("window", "softcap"), WINDOWS)
def test_torch_reference_matches_dense_windowed_attention(monkeypatch, window, softcap):
    monkeypatch.setattr(torch_ref, "KEY_TILE", 12)
    monkeypatch.setattr(torch_ref, "QUERY_TILE", 5)
    monkeypatch.setattr(torch_ref, "decode_attention", lambda *args, **kwargs: None)
    specs = [(37, 11), (9, 9), (50, 1), (23, 1), (64, 30)]
    q, k_cache, v_cache, meta, expected = windowed_case(specs, 4, 2, 8, 4, window, softcap)
    out = torch_ref.TorchReferenceBackend().attend(
        q, k_cache, v_cache, meta, 0.3, sliding_window=window, softcap=softcap
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


needs_kernel = pytest.mark.skipif(paged_decode_window() is None, reason="no C compiler here")


@needs_kernel
@pytest.mark.parametrize(("window", "softcap"), WINDOWS)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block"),
    [(4, 2, 16, 16), (8, 2, 64, 32), (4, 4, 8, 8), (4, 2, 24, 16)],  # vector, vector, scalar x2
)
def test_c_decode_kernel_matches_dense_windowed_attention(
    window, softcap, heads, kv_heads, dim, block
):
    specs = [(1, 1), (15, 1), (16, 1), (17, 1), (40, 1), (129, 1), (300, 1)]
    q, k_cache, v_cache, meta, expected = windowed_case(
        specs, heads, kv_heads, dim, block, window, softcap, seed=dim
    )
    out = decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.3,
        sliding_window=window, softcap=softcap,
    )  # fmt: skip
    assert out is not None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_the_backend_sends_windowed_float32_decodes_to_the_c_kernel(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(torch_ref, "decode_attention", spy)
    q, k_cache, v_cache, meta, expected = windowed_case([(90, 1), (33, 1)], 4, 2, 16, 16, 20, 3.0)
    out = torch_ref.TorchReferenceBackend().attend(
        q, k_cache, v_cache, meta, 0.3, sliding_window=20, softcap=3.0
    )
    assert calls == [{"sliding_window": 20, "softcap": 3.0}]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("window", "softcap"), [(0, None), (-3, None), (4, 0.0), (None, -1.0)])
def test_a_window_below_one_or_a_cap_not_positive_is_refused(window, softcap):
    q, k_cache, v_cache, meta, _ = windowed_case([(8, 2)], 4, 2, 8, 4, None, None)
    with pytest.raises(ValueError, match="sliding_window|softcap"):
        torch_ref.TorchReferenceBackend().attend(
            q, k_cache, v_cache, meta, 0.3, sliding_window=window, softcap=softcap
        )
