"""Triton paged-attention kernels against the torch reference.

Triton decides between compiled and interpreted kernels when it is first imported, and
the test suite imports it early (through transformers). So on CPU the kernel tests
run in a child pytest started with ``TRITON_INTERPRET=1`` from the beginning
(``test_kernels_pass_under_the_triton_interpreter``); in that child, and on CUDA
machines with the compiled kernels, each case runs directly. Small tiles make small
inputs cross many query tiles, key tiles, KV blocks and decode splits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import AttentionMetadata
from kernels.flash_attn_backend import FlashAttnBackend
from kernels.kv_quant import quantize
from kernels.torch_ref import TorchReferenceBackend
from prefixcache import Engine, SamplingParams

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kernels import triton_backend  # noqa: E402
from kernels.triton_backend import DecodeTiles, PrefillTiles, TritonBackend  # noqa: E402

# True in a process started with TRITON_INTERPRET=1 (triton's own helpers are interpreted).
INTERPRETED = triton_backend.interpreter_enabled() and not isinstance(
    triton.language.zeros, triton.runtime.JITFunction
)
COMPILED_CUDA = torch.cuda.is_available() and not INTERPRETED
SMALL_PREFILL = PrefillTiles(block_m=16, block_n=16)
SMALL_DECODE = DecodeTiles(block_n=16, partition=32, block_p=4)
SPLIT_PREFILL = PrefillTiles(block_m=16, block_n=16, partition=48)
needs_cuda = pytest.mark.skipif(not COMPILED_CUDA, reason="needs a CUDA GPU (compiled kernels)")
# Fewer cases than this passing in the interpreter child means cases were skipped.
MIN_INTERPRETED_CASES = 20


@pytest.fixture
def device() -> str:
    """Where the kernels run: the CPU under the interpreter, else the GPU, else skip."""
    if INTERPRETED:
        return "cpu"
    if COMPILED_CUDA:
        return "cuda"
    pytest.skip(
        "runs in the TRITON_INTERPRET=1 child of test_kernels_pass_under_the_triton_interpreter"
    )


def test_kernels_pass_under_the_triton_interpreter():
    if INTERPRETED:
        pytest.skip("this process already runs the kernels under the interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
    ]
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    passed = re.search(r"(\d+) passed", child.stdout)
    assert passed and int(passed.group(1)) >= MIN_INTERPRETED_CASES, report


def paged_case(query_lens, seq_lens, heads, kv_heads, head_dim, block_size=16,
               dtype=torch.float32, device="cpu", seed=0):  # fmt: skip
    """Random pools, scattered block tables and new q/k/v for one step."""
    gen = torch.Generator().manual_seed(seed)
    needed = sum(-(-s // block_size) for s in seq_lens)
    order = torch.randperm(needed + 3, generator=gen).tolist()  # spare blocks stay unused
    tables, used = [], 0
    for total in seq_lens:
        count = -(-total // block_size)
        tables.append(order[used : used + count])
        used += count
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=device)
    pool = (needed + 3, block_size, kv_heads, head_dim)
    tokens = sum(query_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    qkv = rand(tokens, heads + 2 * kv_heads, head_dim)  # views like the model's fused QKV
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    return q, k, v, rand(*pool), rand(*pool), meta


def assert_matches_reference(backend, case, atol=2e-5, rtol=1e-5, scale=None):
    """Forward through ``backend`` and the torch reference on copies of the same pools."""
    q, k, v, k_cache, v_cache, meta = case
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)
    expected = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, meta, scale)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


def test_kv_write_puts_each_row_in_its_slot_and_skips_padding(device):
    q, k, v, k_cache, v_cache, _ = paged_case([9], [9], 4, 2, 16, device=device)
    k_cache, v_cache = k_cache.half(), v_cache.half()  # the write also casts to the pool dtype
    slots = torch.tensor([0, 5, 16, 17, -1, 40, 63, -1, 33], device=device)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    expect_k.view(-1, 2, 16)[slots[keep]] = k[keep].half()
    expect_v.view(-1, 2, 16)[slots[keep]] = v[keep].half()
    triton_backend.write_kv(k, v, k_cache, v_cache, slots, block_size=16)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(4, 2, 16), (8, 2, 64), (4, 4, 128), (6, 2, 80), (8, 1, 32)],
)
def test_prefill_over_cached_prefix_matches_reference(device, heads, kv_heads, head_dim):
    # No prefix, a prefix ending mid-block, and a long prefix spanning many blocks.
    case = paged_case([37, 5, 19], [37, 133, 250], heads, kv_heads, head_dim, device=device)
    assert_matches_reference(TritonBackend(SMALL_PREFILL, SMALL_DECODE), case)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (8, 2, 64), (6, 2, 80)])
def test_prefill_split_over_the_keys_matches_reference(device, heads, kv_heads, head_dim):
    # Splits of 48 keys cut the open prefix, the causal tail and tiles of 16 keys; short
    # sequences leave later splits empty; decode rows of the step stay the decode kernel's.
    case = paged_case([37, 1, 5, 19, 1, 40], [37, 90, 133, 250, 333, 41], heads, kv_heads,
                      head_dim, device=device)  # fmt: skip
    assert_matches_reference(TritonBackend(SPLIT_PREFILL, SMALL_DECODE), case)


def test_split_prefill_of_quantized_pools_matches_reference(device):
    q, k, v, k_cache, v_cache, meta = paged_case([3, 1, 20], [200, 90, 150], 4, 2, 16,
                                                 device=device)  # fmt: skip
    k_pool, v_pool = quantize(k_cache, torch.int8), quantize(v_cache, torch.int8)
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    out = TritonBackend(SPLIT_PREFILL, SMALL_DECODE).forward(q, k, v, k_pool, v_pool, meta, 0.25)
    expected = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, meta, 0.25)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_prefill_splits_only_when_asked_or_on_cuda():
    meta = AttentionMetadata.build([3], [5000], [list(range(313))], 16, device="cpu")
    assert (
        triton_backend._prefill_partition(meta, (1, 1, 2), PrefillTiles(), torch.device("cpu")) == 0
    )
    tiles = PrefillTiles(block_n=64, partition=100)
    with pytest.raises(ValueError, match="not a multiple of block_n"):
        triton_backend._prefill_partition(meta, (1, 1, 2), tiles, torch.device("cpu"))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (8, 2, 64), (6, 2, 80)])
def test_split_k_decode_matches_reference(device, heads, kv_heads, head_dim):
    # 333 keys make 11 splits of 32, merged 4 at a time; 1 and 17 fit in one split.
    case = paged_case([1, 1, 1, 1], [1, 17, 150, 333], heads, kv_heads, head_dim, device=device)
    assert_matches_reference(TritonBackend(SMALL_PREFILL, SMALL_DECODE), case)


def test_mixed_decode_and_prefill_step_matches_reference(device):
    case = paged_case([1, 20, 1, 7], [90, 20, 3, 70], 4, 2, 16, device=device)
    assert_matches_reference(TritonBackend(SMALL_PREFILL, SMALL_DECODE), case)


@pytest.mark.parametrize("block_size", [8, 32])
def test_block_sizes_other_than_the_key_tile_match_reference(device, block_size):
    case = paged_case([1, 23, 1], [77, 61, 140], 4, 2, 16, block_size, device=device)
    assert_matches_reference(TritonBackend(SMALL_PREFILL, SMALL_DECODE), case)


def test_default_tiles_match_reference(device):
    prefill = paged_case([70, 3], [200, 3], 4, 2, 16, device=device)
    assert_matches_reference(TritonBackend(), prefill)
    decode = paged_case([1, 1], [200, 9], 4, 2, 16, device=device)
    assert_matches_reference(TritonBackend(), decode)


def test_float16_pools_match_reference_within_half_precision(device):
    case = paged_case([1, 12], [60, 40], 4, 2, 64, dtype=torch.float16, device=device)
    assert_matches_reference(TritonBackend(SMALL_PREFILL, SMALL_DECODE), case, 2e-3, 2e-3)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "head_dim"),
    [([1, 20, 1, 7], [90, 20, 333, 70], 16), ([5, 1], [133, 150], 80)],
)
def test_quantized_pools_match_reference(device, dtype, query_lens, seq_lens, head_dim):
    q, k, v, k_cache, v_cache, meta = paged_case(query_lens, seq_lens, 4, 2, head_dim,
                                                 device=device)  # fmt: skip
    k_pool, v_pool = quantize(k_cache, dtype), quantize(v_cache, dtype)
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    scale = head_dim**-0.5
    out = TritonBackend(SMALL_PREFILL, SMALL_DECODE).forward(q, k, v, k_pool, v_pool, meta, scale)
    expected = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, meta, scale)
    assert torch.equal(k_pool.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_pool.view(torch.uint8), ref_v.view(torch.uint8))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_bfloat16_is_refused_under_the_interpreter(device):
    if device != "cpu":
        pytest.skip("bfloat16 runs on the GPU; only the interpreter refuses it")
    q, k, v, k_cache, v_cache, meta = paged_case([3], [3], 4, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        TritonBackend().forward(q, k, v, k_cache, v_cache, meta, 0.25)


def test_kernels_rebuild_when_the_interpreter_setting_changes(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_backend._kernels().INTERPRETED
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend._kernels().INTERPRETED
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_backend._kernels().INTERPRETED


def test_engine_greedy_output_with_triton_equals_torch(device, tiny_llama):
    prompts = [list(range(3, 3 + n)) for n in (7, 40, 90)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    results = {}
    for name in ("torch", "triton"):
        engine = Engine.from_pretrained(
            str(tiny_llama), device=device, dtype="float32", attention_backend=name,
            kv_cache_tokens=2048,
        )  # fmt: skip
        first = engine.generate(prompts, params)
        # Turn two extends turn one: its prefill attends to cached blocks.
        follow_up = prompts[2] + first[2].token_ids + [11, 12, 13]
        second = engine.generate([follow_up], params)[0]
        assert second.num_cached_tokens > 0
        results[name] = [out.token_ids for out in first] + [second.token_ids]
    assert results["triton"] == results["torch"]


def _decode_transcripts(engine: Engine) -> list[tuple[list[int], list[float]]]:
    """Three prompts decoding together (a bucket of 4: one padding row), then a turn
    that extends one of them past a block boundary of its cached context."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    prompts = [list(range(3, 3 + n)) for n in (7, 40, 90)]
    outs = engine.generate(prompts, params)
    follow_up = prompts[1] + outs[1].token_ids + [11, 12, 13]
    outs += engine.generate([follow_up], params)
    return [(out.token_ids, out.logprobs) for out in outs]


def test_decode_graphs_give_the_eager_output(device, tiny_llama):
    """The static-buffer decode path (captured and replayed on CUDA, run as is on the
    CPU) against eager decode steps: same ids, logprobs within float32 rounding."""
    from prefixcache.engine.cuda_graphs import DecodeGraphs

    results = {}
    for graphs in (False, True):
        engine = Engine.from_pretrained(
            str(tiny_llama), device=device, dtype="float32", attention_backend="triton",
            kv_cache_tokens=2048, max_model_len=512, enforce_eager=True,
        )  # fmt: skip
        if graphs:
            runner = engine.core.runner
            runner.graphs = DecodeGraphs(runner, 4, 512, capture=device == "cuda")
            runner.graphs.capture_all()
        results[graphs] = _decode_transcripts(engine)
    for (ids, logprobs), (eager_ids, eager_logprobs) in zip(results[True], results[False],
                                                            strict=True):  # fmt: skip
        assert ids == eager_ids
        assert max(abs(a - b) for a, b in zip(logprobs, eager_logprobs, strict=True)) < 1e-4


LLAMA_CASES = (
    ([1, 1, 1], [1, 4097, 700]),
    ([300, 1, 64], [5000, 900, 64]),
    ([40, 1], [30000, 900]),  # few query tiles over a long prefix: split over the keys
)


@needs_cuda
def test_compiled_kernels_match_reference_at_llama_shapes_on_cuda():
    for query_lens, seq_lens in LLAMA_CASES:
        case = paged_case(query_lens, seq_lens, 32, 8, 128, device="cuda")
        assert_matches_reference(TritonBackend(), case, 1e-5, 1e-4)


@needs_cuda
def test_compiled_bfloat16_kernels_err_no_more_than_the_reference_does():
    """bfloat16 outputs differ from any other order of the same sums by a rounding or
    two; so each is held to the exact (float32) answer on the same inputs, and ours may
    err at most twice as much as the torch reference computed in bfloat16."""
    for query_lens, seq_lens in LLAMA_CASES:
        case = paged_case(query_lens, seq_lens, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
        q, k, v, k_cache, v_cache, meta = case
        scale = 128**-0.5
        exact = TorchReferenceBackend().forward(
            q.float(), k.float(), v.float(), k_cache.float(), v_cache.float(), meta, scale
        )
        low = TorchReferenceBackend().forward(
            q, k, v, k_cache.clone(), v_cache.clone(), meta, scale
        )
        ours = TritonBackend().forward(q, k, v, k_cache, v_cache, meta, scale)
        ours_err = (ours.float() - exact).abs().max().item()
        ref_err = (low.float() - exact).abs().max().item()
        assert ours_err <= 2 * ref_err + 1e-3, (query_lens, seq_lens, ours_err, ref_err)


@needs_cuda
def test_flash_attn_matches_reference_on_cuda():
    if not FlashAttnBackend.is_available(torch.device("cuda")):
        pytest.skip("flash-attn is not installed")
    for query_lens, seq_lens in (([1, 1], [3000, 17]), ([300, 64], [5000, 64])):
        case = paged_case(query_lens, seq_lens, 32, 8, 128, 256, torch.bfloat16, "cuda")
        assert_matches_reference(FlashAttnBackend(), case, 2e-3, 2e-2)


@pytest.mark.parametrize(("window", "softcap"), [(5, None), (37, None), (None, 2.0), (7, 1.5)])
def test_windowed_and_capped_attention_matches_dense(device, window, softcap):
    from test_sliding_window_kernels import windowed_case

    specs = [(37, 11), (50, 1), (23, 1), (64, 30), (130, 1)]
    q, k_cache, v_cache, meta, expected = windowed_case(specs, 4, 2, 16, 16, window, softcap)
    to = {"device": device}
    meta = AttentionMetadata.build(
        meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_tables_cpu, 16, **to
    )
    backend = TritonBackend(SMALL_PREFILL, SMALL_DECODE)
    out = backend.attend(
        q.to(**to), k_cache.to(**to), v_cache.to(**to), meta, 0.3,
        sliding_window=window, softcap=softcap,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("code", ["int8", "fp8"])
@pytest.mark.parametrize(("window", "softcap"), [(5, None), (37, None), (7, 1.5)])
def test_windowed_attention_on_quantized_pools_matches_the_unquantized_reference(
    device, code, window, softcap
):
    from test_sliding_window_quant import CODES, quantized_windowed_case

    specs = [(37, 11), (50, 1), (23, 1), (64, 30), (130, 1)]
    q, k_q, v_q, k_f, v_f, meta, _ = quantized_windowed_case(
        specs, 4, 2, 16, 16, window, softcap, CODES[code]
    )
    to = {"device": device}
    meta = AttentionMetadata.build(
        meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_tables_cpu, 16, **to
    )
    backend = TritonBackend(SMALL_PREFILL, SMALL_DECODE)
    limits = {"sliding_window": window, "softcap": softcap}
    out = backend.attend(q.to(**to), k_q.to(**to), v_q.to(**to), meta, 0.3, **limits).cpu()
    reference = backend.attend(q.to(**to), k_f.to(**to), v_f.to(**to), meta, 0.3, **limits).cpu()
    assert not out.isnan().any(), "read a block before the window"
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=2e-5)


def test_gemma_with_a_hybrid_kv_cache_on_triton_equals_torch(device, tiny_model_factory):
    folder = tiny_model_factory("gemma2")  # windows and score caps in the kernels
    prompts = [list(range(3, 3 + n)) for n in (7, 45)]
    params = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=True)
    results = {}
    for name in ("torch", "triton"):
        engine = Engine.from_pretrained(
            str(folder), device=device, dtype="float32", attention_backend=name,
            kv_cache_tokens=1024, max_num_batched_tokens=64, hybrid_kv_cache=True,
            window_kv_cache_tokens=256,
        )  # fmt: skip
        first = engine.generate(prompts, params)
        second = engine.generate([prompts[1] + first[1].token_ids + [11, 12]], params)[0]
        assert second.num_cached_tokens > 0
        results[name] = [out.token_ids for out in first] + [second.token_ids]
        results[name + " logprobs"] = second.logprobs
    assert results["triton"] == results["torch"]
    torch.testing.assert_close(
        results["triton logprobs"], results["torch logprobs"], atol=1e-4, rtol=0
    )
