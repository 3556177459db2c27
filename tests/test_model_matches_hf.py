"""Our paged-KV forward pass against HF transformers on the same weights (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels import get_backend
from prefixcache.cache.kv_cache import KVCache
from prefixcache.engine.model_runner import ModelRunner, SequenceChunk
from prefixcache.models.config import ModelConfig
from prefixcache.models.loader import load_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
RTOL = 1e-4


def _runner(folder, num_blocks: int = 64) -> ModelRunner:
    config = ModelConfig.from_folder(folder)
    model = load_model(folder, config, torch.float32, torch.device("cpu"), "auto")
    kv = KVCache(config, num_blocks, 16, torch.float32, torch.device("cpu"))
    return ModelRunner(model, kv, get_backend("torch", "cpu"), torch.device("cpu"))


def _hf_logits(folder, ids: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= RTOL * scale, f"max abs error {err:.3g} over {RTOL} x {scale:.3g}"


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_prompt_logits_match_hf(tiny_model_factory, arch):
    folder = tiny_model_factory(arch)
    ids = _prompt(70, 300, seed=1)
    ours = _runner(folder).run([SequenceChunk(ids, 0, list(range(5)))], all_logits=True)
    _assert_close(ours, _hf_logits(folder, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_in_three_chunks_matches_hf(tiny_model_factory, arch):
    folder = tiny_model_factory(arch)
    ids = _prompt(70, 300, seed=2)
    runner, blocks = _runner(folder), [7, 3, 11, 2, 9]  # scattered blocks on purpose
    parts = [
        runner.run([SequenceChunk(ids[a:b], a, blocks)], all_logits=True)
        for a, b in ((0, 17), (17, 48), (48, 70))
    ]
    _assert_close(torch.cat(parts), _hf_logits(folder, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_sixteen_decode_steps_match_hf(tiny_model_factory, arch):
    folder = tiny_model_factory(arch)
    ids = _prompt(40, 300, seed=3)
    runner, blocks = _runner(folder), [1, 2, 3, 4]
    logits = runner.run([SequenceChunk(ids, 0, blocks)])
    for _ in range(16):
        ids.append(int(logits[0].argmax()))
        logits = runner.run([SequenceChunk(ids[-1:], len(ids) - 1, blocks)])
    _assert_close(logits[0], _hf_logits(folder, ids)[-1])


def test_llama3_rope_scaling_matches_hf(tiny_model_factory):
    folder = tiny_model_factory("llama", rope_parameters=LLAMA3_ROPE)
    ids = _prompt(90, 300, seed=4)
    ours = _runner(folder).run([SequenceChunk(ids, 0, list(range(6)))], all_logits=True)
    _assert_close(ours, _hf_logits(folder, ids))


def test_tied_embeddings_match_hf(tiny_model_factory):
    folder = tiny_model_factory("qwen3", tie_word_embeddings=True)
    ids = _prompt(30, 300, seed=5)
    ours = _runner(folder).run([SequenceChunk(ids, 0, [0, 1])], all_logits=True)
    _assert_close(ours, _hf_logits(folder, ids))


def test_mixed_batch_equals_each_alone(tiny_model_factory):
    folder = tiny_model_factory("llama")
    runner = _runner(folder)
    prompts = [_prompt(n, 300, seed=n) for n in (5, 33, 17, 64)]
    tables = [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9]]
    batch = runner.run([SequenceChunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    for i, (p, t) in enumerate(zip(prompts, tables, strict=True)):
        alone = runner.run([SequenceChunk(p, 0, t)])
        _assert_close(batch[i : i + 1], alone)
