"""Sliding windows and score caps over int8/fp8 KV pools, in every backend that has both.

Each case quantizes float pools, then checks attention over the quantized pools
against the unquantized torch reference run on the dequantized values (the same
numbers, so the tolerance is tight), and loosely against the original float pools.
Blocks wholly before every query's window are replaced by rows whose scale is NaN: a
backend that reads them (a hybrid KV cache may have handed them to another sequence)
returns NaNs. The engine test runs Gemma 3 (tiny) with an int8 hybrid KV cache. The
Triton kernels get the same cases in ``test_triton_kernels.py``.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_prefix_cache import _conversations
from test_hybrid_kv_cache import _engine, _play_rounds
from test_sliding_window_kernels import WINDOWS, windowed_case

import kernels.torch_ref as torch_ref
from kernels.cpu_quant import decode_attention_quant, paged_decode_quant_window
from kernels.kv_quant import SCALE_BYTES, dequantize, quantize

CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# A cached prefix is computed in other chunks than a full prefill, so a K/V element can
# round to the neighbouring int8 code: about 1e-3 in a logprob, while a window read
# wrongly moves it by far more (and changes tokens).
LOGPROB_TOLERANCE = 2e-3


def quantized_windowed_case(specs, heads, kv_heads, dim, block, window, softcap, code, seed=0):
    """``windowed_case`` with its pools quantized to ``code``: queries, quantized pools,
    their dequantized values as float pools, the metadata, and the dense expectation
    over the original float pools."""
    q, k_cache, v_cache, meta, expected = windowed_case(
        specs, heads, kv_heads, dim, block, window, softcap, seed=seed
    )
    pools = []
    for cache in (k_cache, v_cache):
        rows = quantize(torch.nan_to_num(cache), code)
        raw = rows.view(torch.uint8)
        raw[0, ..., dim:] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # a NaN scale
        pools.append(rows)
    k_q, v_q = pools
    return q, k_q, v_q, dequantize(k_q), dequantize(v_q), meta, expected


def _reference(q, k_float, v_float, meta, window, softcap, monkeypatch):
    """The unquantized torch reference (torch ops only) over float pools."""
    with monkeypatch.context() as patch:
        patch.setattr(torch_ref, "decode_attention", lambda *args, **kwargs: None)
        return torch_ref.TorchReferenceBackend().attend(
            q, k_float, v_float, meta, 0.3, sliding_window=window, softcap=softcap
        )


def _assert_matches(out, reference, expected, code):
    assert not out.isnan().any(), "read a block before the window"
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    loose = 0.25 if code == "fp8" else 0.08  # the quantization error itself
    torch.testing.assert_close(out, expected, rtol=0, atol=loose)


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize(("window", "softcap"), WINDOWS)
def test_torch_reference_on_quantized_pools_matches_unquantized_windowed_reference(
    monkeypatch, code, window, softcap
):
    monkeypatch.setattr(torch_ref, "KEY_TILE", 12)
    monkeypatch.setattr(torch_ref, "QUERY_TILE", 5)
    monkeypatch.setattr(torch_ref, "decode_attention_quant", lambda *args: None)
    specs = [(37, 11), (9, 9), (50, 1), (23, 1), (64, 30)]
    q, k_q, v_q, k_f, v_f, meta, expected = quantized_windowed_case(
        specs, 4, 2, 8, 4, window, softcap, CODES[code]
    )
    reference = _reference(q, k_f, v_f, meta, window, softcap, monkeypatch)
    out = torch_ref.TorchReferenceBackend().attend(
        q, k_q, v_q, meta, 0.3, sliding_window=window, softcap=softcap
    )
    _assert_matches(out, reference, expected, code)


needs_kernel = pytest.mark.skipif(paged_decode_quant_window() is None, reason="no C compiler")


@needs_kernel
@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize(("window", "softcap"), WINDOWS)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block"),
    [(4, 2, 16, 16), (8, 2, 64, 32), (4, 4, 8, 8), (4, 2, 24, 16)],  # vector, vector, scalar x2
)
def test_c_quantized_decode_kernel_matches_unquantized_windowed_reference(
    monkeypatch, code, window, softcap, heads, kv_heads, dim, block
):
    specs = [(1, 1), (15, 1), (16, 1), (17, 1), (40, 1), (129, 1), (300, 1)]
    q, k_q, v_q, k_f, v_f, meta, expected = quantized_windowed_case(
        specs, heads, kv_heads, dim, block, window, softcap, CODES[code], seed=dim
    )
    reference = _reference(q, k_f, v_f, meta, window, softcap, monkeypatch)
    out = decode_attention_quant(
        q, k_q, v_q, meta.block_tables, meta.seq_lens, 0.3, window, softcap
    )
    assert out is not None
    _assert_matches(out, reference, expected, code)


@needs_kernel
def test_the_backend_sends_windowed_quantized_decodes_to_the_c_kernel(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[6:])
        return decode_attention_quant(*args)

    monkeypatch.setattr(torch_ref, "decode_attention_quant", spy)
    q, k_q, v_q, k_f, v_f, meta, expected = quantized_windowed_case(
        [(90, 1), (33, 1)], 4, 2, 16, 16, 20, 3.0, torch.int8
    )
    reference = _reference(q, k_f, v_f, meta, 20, 3.0, monkeypatch)
    out = torch_ref.TorchReferenceBackend().attend(
        q, k_q, v_q, meta, 0.3, sliding_window=20, softcap=3.0
    )
    assert calls == [(20, 3.0)]
    _assert_matches(out, reference, expected, "int8")


def test_gemma3_int8_hybrid_cache_hit_equals_miss(tiny_model_factory):
    folder = tiny_model_factory("gemma3_text")
    conversations = _conversations(seed=7, count=8)
    options = {"kv_cache_dtype": "int8"}
    on = _engine(folder, hybrid_kv_cache=True, window_kv_cache_tokens=384, **options)
    off = _engine(folder, enable_prefix_caching=False, hybrid_kv_cache=False, **options)
    kv_cache = on.core.runner.kv_cache
    window_layer = min(kv_cache.window_layers)
    window_pool = kv_cache.layers[window_layer][0]
    assert window_pool.dtype == torch.int8  # the window pool holds quantized rows
    assert window_pool.shape[0] == on.core.blocks.window.pool.num_blocks == 384 // 16
    assert window_pool.shape[-1] == on.model_config.head_dim + SCALE_BYTES
    played_on, played_off = _play_rounds(on, conversations), _play_rounds(off, conversations)
    for turns_on, turns_off in zip(played_on, played_off, strict=True):
        for a, b in zip(turns_on, turns_off, strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOLERANCE)
    assert on.stats()["hit_tokens"] > 0
    assert sum(t.num_cached_tokens for turns in played_on for t in turns[1:]) > 0
    on.check_integrity()
