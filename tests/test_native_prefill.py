"""The C prefill kernel against dense attention, on paged pools of many shapes."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

import kernels.torch_ref as torch_ref
from kernels.cpu_prefill import paged_prefill, prefill_attention
from kernels.metadata import AttentionMetadata

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("cc") is None,
    reason="the native kernel is built with the system C compiler on Linux",
)


def _case(seed, query_lens, seq_lens, heads, kv_heads, dim, block_size):
    """Random pools whose blocks are handed out in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 5
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(order[at : at + n])
        at += n
    shape = (num_blocks, block_size, kv_heads, dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    query = torch.randn(sum(query_lens), heads, dim, generator=gen)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    return query, k_cache, v_cache, meta


def _dense(query, k_cache, v_cache, meta, scale):
    """Float64 softmax attention, each sequence's keys gathered in position order and
    each new token masked to the keys at or before its own position."""
    out, start = [], 0
    block_size = k_cache.shape[1]
    rows = zip(meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_tables_cpu, strict=True)
    for n, total, table in rows:
        positions = torch.arange(total)
        slots = torch.tensor(table)[positions // block_size] * block_size + positions % block_size
        keys = k_cache.flatten(0, 1)[slots].double()  # [total, kv_heads, dim]
        values = v_cache.flatten(0, 1)[slots].double()
        q = query[start : start + n].double()
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("thd,shd->hts", q, keys) * scale
        query_pos = torch.arange(total - n, total)
        scores.masked_fill_(positions[None, None, :] > query_pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hts,shd->thd", scores.softmax(-1), values))
        start += n
    return torch.cat(out).float()


def _prefill(query, k_cache, v_cache, meta, scale):
    args = (meta.block_tables, meta.seq_lens, meta.query_start_loc, scale)
    return prefill_attention(query, k_cache, v_cache, *args)


def test_the_kernel_builds_and_loads_here():
    assert paged_prefill() is not None


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [
        (4, 2, 16, 16),  # the tiny test models
        (8, 2, 64, 16),  # the 20M-parameter Qwen2 shape
        (32, 8, 128, 16),  # Llama-3-8B's heads
        (8, 8, 32, 32),  # no GQA, bigger blocks
        (8, 1, 48, 8),  # MQA: 8 query heads share each key tile
    ],
)
def test_matches_dense_attention_over_scattered_blocks(heads, kv_heads, dim, block_size):
    # Several sequences in one step: a chunk over a long prefix, a first chunk, a
    # decode row, a chunk longer than one work item; lengths off block and tile edges.
    query_lens = [36, 70, 1, 300, 5]
    seq_lens = [1037, 70, 129, 365, 64]
    query, k_cache, v_cache, meta = _case(0, query_lens, seq_lens, heads, kv_heads, dim, block_size)
    got = _prefill(query, k_cache, v_cache, meta, 0.3)
    want = _dense(query, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("new_tokens", [1, 2, 63, 64, 65, 127])
def test_each_new_token_sees_exactly_the_keys_up_to_its_own(new_tokens):
    # The masked tiles are the last ones; these lengths put the new tokens' first
    # position at every offset of a 64-key tile and across two tiles.
    query, k_cache, v_cache, meta = _case(1, [new_tokens], [190], 4, 2, 16, 16)
    got = _prefill(query, k_cache, v_cache, meta, 0.25)
    want = _dense(query, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_the_backend_gives_the_same_output_with_and_without_the_kernel(monkeypatch):
    query, k_cache, v_cache, meta = _case(2, [36, 3], [4036, 20], 8, 2, 64, 16)
    backend = torch_ref.TorchReferenceBackend()
    with_kernel = backend.attend(query, k_cache, v_cache, meta, 0.125)
    monkeypatch.setattr(torch_ref, "prefill_attention", lambda *args: None)
    without = backend.attend(query, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(with_kernel, without, rtol=2e-5, atol=2e-5)


def test_shapes_the_kernel_does_not_take_are_declined():
    query, k_cache, v_cache, meta = _case(3, [4], [10], 4, 2, 24, 16)  # dim not a multiple of 16
    assert _prefill(query, k_cache, v_cache, meta, 0.2) is None
    query, k_cache, v_cache, meta = _case(3, [4], [10], 4, 2, 16, 16)
    assert _prefill(query.double(), k_cache.double(), v_cache.double(), meta, 0.2) is None


def test_a_rows_bits_do_not_depend_on_how_the_step_was_cut():
    # What makes a prefix-cache hit compute the same attention as the cold prefill of
    # the same positions: each row's arithmetic is its own, whatever else is in the
    # step (other tokens of its sequence, other sequences, the thread count).
    gen = torch.Generator().manual_seed(4)
    block_size, total, new = 16, 500, 100
    k_cache = torch.randn(40, block_size, 2, 64, generator=gen)
    v_cache = torch.randn(40, block_size, 2, 64, generator=gen)
    table = torch.randperm(40, generator=gen)[: -(-total // block_size)].tolist()
    query = torch.randn(new, 8, 64, generator=gen)

    def attend(rows: slice, context: int, others: int = 0):
        lens, tables, parts = [], [], []
        for _ in range(others):  # unrelated sequences batched in front
            lens.append(7)
            tables.append(table)
            parts.append(torch.randn(7, 8, 64, generator=gen))
        lens.append(rows.stop - rows.start)
        tables.append(table)
        parts.append(query[rows])
        meta = AttentionMetadata.build(lens, [*[7] * others, context], tables, block_size)
        out = _prefill(torch.cat(parts), k_cache, v_cache, meta, 0.125)
        return out[sum(lens[:-1]) :]

    whole = attend(slice(0, new), total)
    first, rest = attend(slice(0, 40), total - 60), attend(slice(40, new), total, others=3)
    assert torch.equal(whole[:40], first)
    assert torch.equal(whole[40:], rest)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attend(slice(0, new), total), whole)
    finally:
        torch.set_num_threads(threads)
