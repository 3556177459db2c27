"""Quantized KV rows: round-trip error bounds, the row layout, sizing and bad options."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_quant import (
    KV_CACHE_DTYPES,
    SCALE_BYTES,
    code_values,
    dequantize,
    quantize,
    row_bytes,
    scales,
    write_quantized,
)
from prefixcache.cache.kv_cache import KVCache, bytes_per_token
from prefixcache.config import KV_CACHE_DTYPES as CONFIG_KV_CACHE_DTYPES
from prefixcache.engine.builder import resolve_config
from prefixcache.models.config import ModelConfig
from prefixcache.models.fingerprint import model_fingerprint

INT8, FP8 = torch.int8, torch.float8_e4m3fn


def _rows(seed: int = 0, shape=(64, 4, 64)) -> torch.Tensor:
    """Rows with magnitudes over many orders, outliers, zeros and tiny values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 3, shape[0])[:, None, None]
    x[0] = 0.0  # an all-zero row must stay zero
    x[1, :, 5] = 1e4  # one outlier per row
    return x


def test_int8_round_trip_error_is_at_most_half_a_step():
    x = _rows()
    rows = quantize(x, INT8)
    step = scales(rows)[..., None]
    error = (dequantize(rows) - x).abs()
    # Half a step, plus float32 rounding of x / step.
    assert (error <= step * (0.5 + 1e-5)).all()
    assert (step <= x.abs().amax(-1, keepdim=True) / 127 * (1 + 2**-10) + 2**-24).all()
    assert torch.equal(dequantize(rows)[0], torch.zeros_like(x[0]))


def test_fp8_round_trip_error_is_within_e4m3_precision():
    x = _rows(1)
    rows = quantize(x, FP8)
    step = scales(rows)[..., None]
    error = (dequantize(rows) - x).abs()
    # Three mantissa bits: half an ulp is 2^-4 relative; subnormals are 2^-9 * step apart.
    assert (error <= x.abs() * 2**-4 + step * 2**-10 + 1e-12).all()
    assert not dequantize(rows).isnan().any()


@pytest.mark.parametrize("dtype", [INT8, FP8])
def test_row_is_codes_then_its_float16_scale(dtype):
    x = _rows(2, (8, 2, 16))
    rows = quantize(x, dtype)
    assert rows.dtype == dtype and rows.shape == (8, 2, 16 + SCALE_BYTES)
    raw = rows.view(torch.uint8)
    scale = raw[..., 16:].contiguous().view(torch.float16).float()[..., 0]
    values = code_values(dtype, torch.device("cpu"))[raw[..., :16].long()]
    torch.testing.assert_close(values * scale[..., None], dequantize(rows), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [INT8, FP8])
def test_write_puts_quantized_rows_in_their_slots_only(dtype):
    pool = torch.zeros(4, 2, 3, 8 + SCALE_BYTES, dtype=dtype)
    k_pool, v_pool = pool.clone(), pool.clone()
    key, value = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    write_quantized(key, value, k_pool, v_pool, torch.tensor([5, 2]))
    flat_k = k_pool.view(torch.uint8).view(-1, 3, 8 + SCALE_BYTES)
    assert torch.equal(flat_k[5], quantize(key[0], dtype).view(torch.uint8))
    assert torch.equal(flat_k[2], quantize(key[1], dtype).view(torch.uint8))
    untouched = [i for i in range(8) if i not in (2, 5)]
    assert not flat_k[untouched].any()
    torch.testing.assert_close(dequantize(v_pool.view(-1, 3, 10)[5]), value[0], atol=0.1, rtol=0.1)


def test_int8_stores_at_least_3_5x_fewer_bytes_per_token_than_float32():
    config = _qwen_like()
    full = bytes_per_token(config, torch.float32)
    for kv_dtype in ("int8", "fp8"):
        assert full / bytes_per_token(config, torch.float32, kv_dtype) >= 3.5
    # Scales included: 64 one-byte codes plus a 2-byte scale per row.
    assert row_bytes(64, "int8", torch.float32) == 66
    cache = KVCache(config, 4, 16, torch.float32, torch.device("cpu"), "int8")
    assert cache.bytes_per_token == bytes_per_token(config, torch.float32, "int8")


def test_memory_budget_holds_more_tokens_when_quantized(tiny_llama):
    budget = 1 << 20
    plain = resolve_config(str(tiny_llama), device="cpu", kv_cache_memory=budget)
    int8 = resolve_config(
        str(tiny_llama), device="cpu", kv_cache_memory=budget, kv_cache_dtype="int8"
    )
    config = ModelConfig.from_folder(tiny_llama)
    assert plain.kv_cache_tokens == budget // bytes_per_token(config, torch.float32)
    assert int8.kv_cache_tokens == budget // bytes_per_token(config, torch.float32, "int8")
    assert int8.kv_cache_tokens > 3 * plain.kv_cache_tokens


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype must be one of auto, int8, fp8"),
        ({"kv_cache_memory": 0}, "kv_cache_memory must be a positive"),
        ({"kv_cache_memory": 1 << 20, "kv_cache_tokens": 4096}, "not both"),
    ],
)
def test_bad_kv_options_are_refused_with_a_clear_error(tiny_llama, options, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(str(tiny_llama), device="cpu", **options)


def test_odd_head_dim_cannot_be_quantized():
    config = _qwen_like(head_dim=15)
    with pytest.raises(ValueError, match="even head_dim"):
        KVCache(config, 2, 16, torch.float32, torch.device("cpu"), "fp8")


def test_fingerprint_names_the_kv_dtype(tiny_llama):
    prints = {
        kv: model_fingerprint(tiny_llama, "LlamaForCausalLM", "float32", "auto", kv)
        for kv in KV_CACHE_DTYPES
    }
    assert len(set(prints.values())) == 3
    assert prints["auto"] == model_fingerprint(tiny_llama, "LlamaForCausalLM", "float32", "auto")
    assert CONFIG_KV_CACHE_DTYPES == KV_CACHE_DTYPES


def _qwen_like(head_dim: int = 64) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    )
