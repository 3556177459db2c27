"""The engine on a CUDA GPU: logits against HF transformers, cache on against cache off,
and host-tier onloads over the side stream, for each GPU attention backend.

Skipped without CUDA (the CPU suite covers the same paths with the CPU backends).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels import get_backend
from prefixcache import Engine, SamplingParams
from prefixcache.cache.kv_cache import KVCache
from prefixcache.engine.model_runner import ModelRunner, SequenceChunk
from prefixcache.models.config import ModelConfig
from prefixcache.models.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ["triton", "torch"]
RTOL = 1e-4  # float32 on both sides (TF32 is off for float32 matmuls by default)
LOGPROB_TOL = 1e-4
CUDA = torch.device("cuda")


def _runner(folder, backend: str) -> ModelRunner:
    config = ModelConfig.from_folder(folder)
    model = load_model(folder, config, torch.float32, CUDA, "auto")
    kv = KVCache(config, 64, 16, torch.float32, CUDA)
    return ModelRunner(model, kv, get_backend(backend, "cuda"), CUDA)


def _hf_logits(folder, ids: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(CUDA).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids], device=CUDA)).logits[0]


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= RTOL * scale, f"max abs error {err:.3g} over {RTOL} x {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_and_decode_match_hf_on_cuda(tiny_llama, backend):
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    runner, blocks = _runner(tiny_llama, backend), [7, 3, 11, 2, 9, 5]  # scattered
    parts = [
        runner.run([SequenceChunk(ids[a:b], a, blocks)], all_logits=True)
        for a, b in ((0, 17), (17, 48), (48, 70))
    ]
    _assert_close(torch.cat(parts), _hf_logits(tiny_llama, ids))
    logits = parts[-1][-1:]
    for _ in range(8):
        ids.append(int(logits[0].argmax()))
        logits = runner.run([SequenceChunk(ids[-1:], len(ids) - 1, blocks)])
    _assert_close(logits[0], _hf_logits(tiny_llama, ids)[-1])


def _engine(folder, backend: str, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 1024)
    return Engine.from_pretrained(
        str(folder), device="cuda", dtype="float32", attention_backend=backend, **kwargs
    )


def _conversations(seed: int, count: int, vocab: int = 300) -> list[list[list[int]]]:
    """Turns of token ids; half the conversations share a 96-token opening."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(96)]
    convs = []
    for _ in range(count):
        opening = shared if rng.random() < 0.5 else []
        turns = [opening + [rng.randrange(3, vocab) for _ in range(rng.randint(5, 60))]]
        turns += [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))] for _ in range(2)]
        convs.append(turns)
    return convs


def _play(engine: Engine, conversations) -> list[tuple[list[int], list[float]]]:
    """Every turn's (ids, logprobs); each turn sends the history and the last output."""
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=True)
    results = []
    for turns in conversations:
        history: list[int] = []
        for turn in turns:
            history += turn
            out = engine.generate(history, params)[0]
            results.append((out.token_ids, out.logprobs))
            history += out.token_ids
    return results


def _assert_same(on, off) -> None:
    for (ids_on, lp_on), (ids_off, lp_off) in zip(on, off, strict=True):
        assert ids_on == ids_off
        assert max(abs(a - b) for a, b in zip(lp_on, lp_off, strict=True)) <= LOGPROB_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_conversations_with_eviction_equal_cache_off_on_cuda(tiny_llama, backend):
    conversations = _conversations(seed=5, count=30)
    on = _engine(tiny_llama, backend)
    off = _engine(tiny_llama, backend, enable_prefix_caching=False)
    _assert_same(_play(on, conversations), _play(off, conversations))
    stats = on.stats()
    assert stats["hit_tokens"] > 0 and stats["evicted_blocks"] > 0
    on.check_integrity()


def test_host_tier_onloads_equal_cache_off_on_cuda(tiny_llama):
    """Evicted blocks go to pinned host memory and come back over the side stream: the
    conversations run twice, and the second time their turns are on the host."""
    conversations = _conversations(seed=6, count=20) * 2
    on = _engine(tiny_llama, "triton", kv_cache_tokens=512, host_cache_tokens=8192)
    off = _engine(tiny_llama, "triton", kv_cache_tokens=512, enable_prefix_caching=False)
    _assert_same(_play(on, conversations), _play(off, conversations))
    stats = on.stats()
    assert stats["host_hit_tokens"] > 0 and stats["onloaded_bytes"] > 0
    on.check_integrity()
