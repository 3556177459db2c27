"""The C decode kernel against the torch reference, on many shapes and block layouts."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

import kernels.torch_ref as torch_ref
from kernels.cpu_native import decode_attention, paged_decode_window
from kernels.metadata import AttentionMetadata

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("cc") is None,
    reason="the native kernel is built with the system C compiler on Linux",
)


def test_the_kernel_builds_and_loads_here():
    assert paged_decode_window() is not None


def _reference(monkeypatch, query, k_cache, v_cache, meta, scale):
    monkeypatch.setattr(torch_ref, "decode_attention", lambda *args, **kwargs: None)
    return torch_ref.TorchReferenceBackend().attend(query, k_cache, v_cache, meta, scale)


def _case(seed, lens, heads, kv_heads, dim, block_size, scattered=True):
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 7
    order = torch.randperm(num_blocks, generator=gen) if scattered else torch.arange(num_blocks)
    tables, at = [], 0
    for n in needed:
        tables.append(order[at : at + n].tolist())
        at += n
    shape = (num_blocks, block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    query = torch.randn(len(lens), heads, dim, generator=gen)
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, block_size)
    return query, k_cache, v_cache, meta


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [
        (4, 2, 16, 16),  # the tiny test models
        (32, 8, 128, 16),  # Llama-3-8B's heads
        (8, 8, 64, 32),  # no GQA, bigger blocks
        (8, 1, 32, 16),  # MQA
        (6, 2, 80, 16),  # a head dim that is not a power of two
        (4, 4, 8, 8),  # the scalar path: dim and block size below 16
        (4, 2, 24, 16),  # the scalar path: dim not a multiple of 16
    ],
)
def test_matches_the_torch_reference(monkeypatch, heads, kv_heads, dim, block_size):
    lens = [1, 15, 16, 17, 33, 200, 1000, 4097]
    query, k_cache, v_cache, meta = _case(0, lens, heads, kv_heads, dim, block_size)
    got = decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.3)
    want = _reference(monkeypatch, query, k_cache, v_cache, meta, 0.3)
    # atol: sums over 4,097 keys in another order round differently in float32; up to
    # 3.1e-6 seen on some CPUs at head dim 128 (a wrong tile or scale is off by > 1e-2)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-5)


def test_the_same_context_in_consecutive_or_scattered_blocks_gives_the_same_output():
    lens = [3000, 5000, 64]
    query, k_cache, v_cache, meta = _case(1, lens, 4, 2, 16, 16, scattered=True)
    tables = [t[: -(-n // 16)] for t, n in zip(meta.block_tables_cpu, lens, strict=True)]
    moved = torch.tensor([b for t in tables for b in t])  # each sequence's blocks, in order
    consecutive, at = [], 0
    for t in tables:
        consecutive.append(list(range(at, at + len(t))))
        at += len(t)
    packed = AttentionMetadata.build([1] * len(lens), lens, consecutive, 16)
    scattered = decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25)
    packed_out = decode_attention(
        query, k_cache[moved], v_cache[moved], packed.block_tables, packed.seq_lens, 0.25
    )
    torch.testing.assert_close(scattered, packed_out, rtol=0, atol=0)


def test_large_scores_stay_finite(monkeypatch):
    query, k_cache, v_cache, meta = _case(2, [500, 2000], 4, 2, 16, 16)
    query = query * 40.0  # softmax dominated by a few keys: the running max must rescale
    got = decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 1.0)
    want = _reference(monkeypatch, query, k_cache, v_cache, meta, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_backend_routes_float32_decode_steps_to_it(monkeypatch):
    calls = []
    real = torch_ref.decode_attention
    monkeypatch.setattr(
        torch_ref, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    query, k_cache, v_cache, meta = _case(3, [40, 50], 4, 2, 16, 16)
    torch_ref.TorchReferenceBackend().attend(query, k_cache, v_cache, meta, 0.25)
    assert calls
    calls.clear()
    torch_ref.TorchReferenceBackend().attend(
        query.double(), k_cache.double(), v_cache.double(), meta, 0.25
    )
    assert not calls  # float64 goes to torch ops; the kernel is float32 only
