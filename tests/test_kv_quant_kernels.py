"""Attention over int8/fp8 pools: the torch reference and the C decode kernel against a
naive float64 attention over the dequantized pools. (The Triton kernels are checked
on quantized pools in ``test_triton_kernels.py``, under the interpreter.)"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

import kernels.torch_ref as torch_ref
from kernels.cpu_quant import decode_attention_quant, paged_decode_quant_window
from kernels.flash_attn_backend import FlashAttnBackend
from kernels.kv_quant import SCALE_BYTES, dequantize, write_quantized
from kernels.metadata import AttentionMetadata

DTYPES = [torch.int8, torch.float8_e4m3fn]
native = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("cc") is None,
    reason="the native kernel is built with the system C compiler on Linux",
)


def quantized_case(query_lens, seq_lens, heads, kv_heads, dim, block_size, dtype, seed=0,
                   scattered=True):  # fmt: skip
    """Quantized pools filled at random through block tables (scattered, or runs of
    consecutive blocks), and queries."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 5
    order = torch.randperm(num_blocks, generator=gen) if scattered else torch.arange(num_blocks)
    order = order.tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(order[at : at + n])
        at += n
    shape = (num_blocks, block_size, kv_heads, dim + SCALE_BYTES)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    rows = num_blocks * block_size
    keys = torch.randn(rows, kv_heads, dim, generator=gen) * 2
    write_quantized(keys, torch.randn(rows, kv_heads, dim, generator=gen), k_cache, v_cache,
                    torch.arange(rows))  # fmt: skip
    query = torch.randn(sum(query_lens), heads, dim, generator=gen)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    return query, k_cache, v_cache, meta


def naive_attention(query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """Causal attention in float64 over the dequantized pools, one sequence at a time."""
    keys, values = dequantize(k_cache).double(), dequantize(v_cache).double()
    heads, kv_heads = query.shape[1], k_cache.shape[2]
    out, start = torch.empty_like(query), 0
    for n, total, table in zip(meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_tables_cpu,
                               strict=True):  # fmt: skip
        k = keys[table].flatten(0, 1)[:total].repeat_interleave(heads // kv_heads, 1)
        v = values[table].flatten(0, 1)[:total].repeat_interleave(heads // kv_heads, 1)
        q = query[start : start + n].double()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        visible = torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start : start + n] = torch.einsum("hqk,khd->qhd", probs, v).float()
        start += n
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "block_size", "scattered"),
    [
        ([1, 1, 1], [1, 40, 300], 16, True),  # short decodes: the batched path
        ([1, 1], [2100, 37], 16, True),  # a long decode: gathered pieces
        ([1, 3], [2100, 300], 16, False),  # long runs of blocks: read as views
        ([5, 1, 40], [70, 33, 40], 16, True),  # prefill over a prefix, mixed with decode
        ([20], [180], 4, True),  # many short runs of blocks
    ],
)
def test_torch_reference_reads_quantized_pools(monkeypatch, dtype, query_lens, seq_lens,
                                               block_size, scattered):  # fmt: skip
    monkeypatch.setattr(torch_ref, "decode_attention_quant", lambda *args: None)
    query, k_cache, v_cache, meta = quantized_case(query_lens, seq_lens, 4, 2, 16, block_size,
                                                   dtype, scattered=scattered)  # fmt: skip
    out = torch_ref.TorchReferenceBackend().attend(query, k_cache, v_cache, meta, 0.3)
    expected = naive_attention(query, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@native
def test_the_quantized_kernel_builds_and_loads_here():
    assert paged_decode_quant_window() is not None


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [
        (4, 2, 16, 16),  # the tiny test models
        (8, 2, 64, 16),  # the 20M Qwen2-shaped bench model
        (8, 8, 32, 32),  # no GQA, bigger blocks
        (8, 1, 128, 16),  # MQA, the widest vector path
        (6, 2, 48, 16),  # a head dim the vector path takes without a fixed chunk count
        (4, 2, 24, 8),  # the scalar path
    ],
)
def test_c_decode_kernel_matches_naive_attention(dtype, heads, kv_heads, dim, block_size):
    lens = [1, 15, 16, 17, 200, 1500]
    query, k_cache, v_cache, meta = quantized_case([1] * len(lens), lens, heads, kv_heads, dim,
                                                   block_size, dtype, seed=dim)  # fmt: skip
    out = decode_attention_quant(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.2)
    assert out is not None
    torch.testing.assert_close(out, naive_attention(query, k_cache, v_cache, meta, 0.2),
                               atol=2e-5, rtol=1e-5)  # fmt: skip


@native
def test_engine_decode_steps_on_quantized_pools_use_the_c_kernel(monkeypatch):
    query, k_cache, v_cache, meta = quantized_case([1, 1], [50, 3000], 4, 2, 16, 16, torch.int8)
    calls = []
    monkeypatch.setattr(torch_ref, "decode_attention_quant",
                        lambda *args: calls.append(1) or decode_attention_quant(*args))  # fmt: skip
    out = torch_ref.TorchReferenceBackend().attend(query, k_cache, v_cache, meta, 0.3)
    assert calls == [1]
    torch.testing.assert_close(out, naive_attention(query, k_cache, v_cache, meta, 0.3),
                               atol=2e-5, rtol=1e-5)  # fmt: skip


@native
def test_c_kernel_refuses_shapes_it_cannot_take():
    query, k_cache, v_cache, meta = quantized_case([1], [20], 34, 2, 16, 16, torch.int8)
    # 17 query heads per KV head is over the kernel's group limit: None, not wrong output.
    assert decode_attention_quant(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                  0.2) is None  # fmt: skip


def test_flash_attn_backend_leaves_quantized_pools_to_its_fallback():
    # float16 queries and 256-token blocks are what flash-attn reads; quantized rows it
    # cannot, so they must go to the fallback even then (flash_attn is not needed here).
    query, k_cache, v_cache, meta = quantized_case([3, 1], [300, 40], 4, 2, 16, 256, torch.int8)
    out = FlashAttnBackend().attend(query.half(), k_cache, v_cache, meta, 0.3)
    expected = naive_attention(query.half().float(), k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
