"""A quantized KV cache in the engine: the prefix cache never changes output at a given
KV dtype, quantized blocks move through the host and disk tiers byte for byte, a disk
cache of another KV dtype is a miss, and every front reports the KV bytes per token."""

from __future__ import annotations

import io
import json
import random

import httpx
import pytest
import torch
from reference_outputs import memoized_outputs
from server_harness import running_server

from prefixcache import Engine, SamplingParams, cli
from prefixcache.cache.kv_cache import bytes_per_token
from prefixcache.tiers.base import KVChunk
from prefixcache.tiers.kv_file import PREFIX, ChunkFileError, ChunkLayout, decode, encode
from prefixcache.tiers.transfer import KVTransfer
from server.launch import print_banner

CHUNK = 64
PARAMS = SamplingParams(max_tokens=6, logprobs=True)
LOGPROB_TOLERANCE = 1e-4  # reused KV is summed in another order than a full prefill
QUANTIZED = ["int8", "fp8"]


def _engine(folder, kv_cache_dtype: str, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 2048)
    return Engine.from_pretrained(
        str(folder), device="cpu", dtype="float32", chunk_size=CHUNK,
        kv_cache_dtype=kv_cache_dtype, **kwargs,
    )  # fmt: skip


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(n)]


@pytest.fixture(scope="module", params=QUANTIZED)
def kv_dtype(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(tiny_llama, kv_dtype):
    """Cache-off token ids and logprobs at the same KV dtype, once per prompt."""
    return memoized_outputs(_engine(tiny_llama, kv_dtype, enable_prefix_caching=False), PARAMS)


def _assert_same(out, expected) -> None:
    token_ids, logprobs = expected
    assert out.token_ids == token_ids
    assert out.logprobs == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE)


def test_cache_hit_equals_miss_at_each_kv_dtype(tiny_llama, kv_dtype, reference):
    engine = _engine(tiny_llama, kv_dtype, max_num_batched_tokens=96)  # chunked prefill
    shared = _prompt(1, 150)
    first = engine.generate(shared + _prompt(2, 30), PARAMS)[0]
    turn_two = shared + _prompt(2, 30) + first.token_ids + _prompt(3, 20)
    prompts = [turn_two, shared + _prompt(4, 41), shared[:100]]
    outs = engine.generate(prompts, PARAMS)
    _assert_same(first, reference(shared + _prompt(2, 30)))
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.num_cached_tokens >= 96
        _assert_same(out, reference(prompt))
    engine.check_integrity()


def test_quantized_output_stays_close_to_full_precision(tiny_llama, kv_dtype, reference):
    prompt = _prompt(5, 300)
    full = _engine(tiny_llama, "auto", enable_prefix_caching=False).generate(prompt, PARAMS)[0]
    token_ids, logprobs = reference(prompt)
    assert token_ids[:3] == full.token_ids[:3]
    assert logprobs[0] == pytest.approx(full.logprobs[0], abs=0.05)


class _Copies:
    """Records the bytes every ``KVTransfer.read`` returns and every ``write`` receives."""

    def __init__(self, monkeypatch) -> None:
        self.read, self.written = [], []
        original_read, original_write = KVTransfer.read, KVTransfer.write

        def read(transfer, block_ids):
            data = original_read(transfer, block_ids)
            self.read.append(data.clone())
            return data

        def write(transfer, data, block_ids):
            self.written.append(data.clone())
            original_write(transfer, data, block_ids)

        monkeypatch.setattr(KVTransfer, "read", read)
        monkeypatch.setattr(KVTransfer, "write", write)


def _bytes(data: torch.Tensor) -> bytes:
    return data.contiguous().view(torch.uint8).numpy().tobytes()


def test_quantized_blocks_travel_host_and_disk_byte_for_byte(
    tiny_llama, kv_dtype, reference, tmp_path, monkeypatch
):
    copies = _Copies(monkeypatch)
    prompt = _prompt(6, 3 * CHUNK + 20)
    first = _engine(tiny_llama, kv_dtype, disk_cache_dir=tmp_path)
    _assert_same(first.generate(prompt, PARAMS)[0], reference(prompt))
    stored = {_bytes(d) for d in copies.read}  # every chunk written through to disk
    files = sorted(next(tmp_path.iterdir()).glob("*.kv"))
    header = json.loads(files[0].read_bytes()[PREFIX.size :].split(b"}", 1)[0] + b"}")
    assert header["kv_cache_dtype"] == kv_dtype and header["shape"][-1] == 16 + 2
    del first
    # A restarted engine onloads from disk; evicted again, its blocks go to the host.
    second = _engine(tiny_llama, kv_dtype, disk_cache_dir=tmp_path, host_cache_tokens=1024)
    out = second.generate(prompt, PARAMS)[0]
    assert out.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    onloaded = [_bytes(d) for d in copies.written]
    assert onloaded and all(b in stored for b in onloaded)  # no re-quantization anywhere
    cache = second.core.blocks.cache
    cache.evict(cache.num_evictable_blocks)
    again = second.generate(prompt, PARAMS)[0]
    assert second.stats()["host_hit_tokens"] == out.num_cached_tokens
    assert _bytes(copies.written[-1]) in {_bytes(d) for d in copies.read}
    for o in (out, again):
        _assert_same(o, reference(prompt))
    second.check_integrity()


def test_disk_cache_of_another_kv_dtype_is_a_miss(tiny_llama, tmp_path):
    prompt = _prompt(7, 2 * CHUNK + 10)
    _engine(tiny_llama, "auto", disk_cache_dir=tmp_path).generate(prompt, PARAMS)
    for kv_dtype in QUANTIZED:
        engine = _engine(tiny_llama, kv_dtype, disk_cache_dir=tmp_path)
        assert engine.generate(prompt, PARAMS)[0].num_cached_tokens == 0
        assert engine.stats()["disk_hit_tokens"] == 0
    assert len(list(tmp_path.iterdir())) == 3  # one folder per fingerprint


def test_chunk_file_of_another_kv_dtype_is_refused_even_under_one_fingerprint():
    shape = (1, 2, 1, 4, 1, 8 + 2)
    int8 = ChunkLayout("fp", torch.int8, shape)
    data = torch.zeros(shape, dtype=torch.int8)
    chunk = KVChunk(1, b"\0" * 16, 0, torch.arange(4).int().numpy(), data)
    raw = bytearray(b"".join(encode(int8, chunk)))
    assert decode(int8, raw).data.shape == shape
    with pytest.raises(ChunkFileError, match="dtype"):
        decode(ChunkLayout("fp", torch.float8_e4m3fn, shape), raw)


def test_kv_bytes_per_token_in_stats_banner_and_cache_endpoint(tiny_llama, monkeypatch):
    engine = _engine(tiny_llama, "int8")
    expected = bytes_per_token(engine.model_config, torch.float32, "int8")
    assert engine.stats()["kv_bytes_per_token"] == engine.limits.kv_bytes_per_token == expected
    out = io.StringIO()
    print_banner(engine.limits, "tiny", "127.0.0.1", 8123, 0, random_weights=True, out=out)
    assert f"KV dtype    int8, {expected} bytes per token" in out.getvalue()
    options = {"kv_cache_tokens": 1024, "kv_cache_dtype": "fp8"}
    with running_server(str(tiny_llama), engine_options=options) as server:
        info = httpx.get(server.url + "/v1/cache").json()
    assert info["kv_bytes_per_token"] == expected  # fp8 rows are as wide as int8 rows
    calls = []
    monkeypatch.setattr(  # the engine serve would start, built here
        "server.launch.serve",
        lambda model, options, **kw: calls.append(Engine.from_pretrained(model, **options)),
    )
    argv = ["serve", "--model", str(tiny_llama), "--device", "cpu", "--max-model-len", "512"]
    assert cli.main([*argv, "--kv-cache-dtype", "fp8", "--kv-cache-memory", "1000000"]) == 0
    assert calls[0].config.kv_cache_dtype == "fp8"
    assert calls[0].config.kv_cache_tokens == 1000000 // expected
