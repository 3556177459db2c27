"""Engine generation against HF transformers, batching, sampling controls, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixcache import Engine, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
PROMPTS = [
    "The quick brown fox",
    "Prefix caching saves",
    "In 1987, the committee decided that",
    "Über café 中文 and emoji 🙂 go here:",
    "a",
]


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


def _hf_greedy(folder, prompt_ids: list[int], max_new: int) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_equals_hf_generate(tiny_model_factory, arch):
    folder = tiny_model_factory(arch)
    engine = _engine(folder)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=32))
    for out in outs:
        assert out.token_ids == _hf_greedy(folder, out.prompt_token_ids, 32), out.prompt_token_ids
    engine.check_integrity()


def test_batch_of_mixed_lengths_equals_each_alone(tiny_llama):
    engine = _engine(tiny_llama)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [p * k for k, p in enumerate(PROMPTS, start=1)]
    together = engine.generate(prompts, params)
    for prompt, out in zip(prompts, together, strict=True):
        assert engine.generate(prompt, params)[0].token_ids == out.token_ids


def test_max_tokens_and_ignore_eos(tiny_llama):
    out = _engine(tiny_llama).generate("hello", SamplingParams(max_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_token_ids_end_generation(tiny_llama):
    engine = _engine(tiny_llama)
    free = engine.generate("hello", SamplingParams(max_tokens=10, ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    params = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[stop_at])
    out = engine.generate("hello", params)[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_across_batches(tiny_llama):
    engine = _engine(tiny_llama)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    alone = engine.generate("seeded prompt", seeded)[0].token_ids
    batch = engine.generate(["x y z", "seeded prompt", "more"], [other, seeded, other])
    assert batch[1].token_ids == alone


def test_chat_renders_template_and_generates(tiny_llama):
    engine = _engine(tiny_llama)
    out = engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5))[0]
    text = engine.tokenizer.decode(out.prompt_token_ids)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", SamplingParams(), "prompt is empty"),
        ([[]], SamplingParams(), "no tokens"),
        ([1, 10**9], SamplingParams(), "outside the vocabulary"),
        ([[1, -3]], SamplingParams(), "outside the vocabulary"),
        ([[1, "x"]], SamplingParams(), "must be integers"),
        ([[2.5, 3]], SamplingParams(), "must be integers"),
        ("word " * 300, SamplingParams(max_tokens=10), "over max_model_len"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(tiny_llama, prompt, params, message):
    engine = _engine(tiny_llama, max_model_len=256)
    before = engine.stats()
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, params)
    assert engine.stats() == before and not engine.has_unfinished_requests()
    engine.check_integrity()


def test_invalid_sampling_params_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_prompt_larger_than_kv_cache_is_refused(tiny_llama):
    engine = _engine(tiny_llama, kv_cache_tokens=64)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        engine.generate([5] * 60, SamplingParams(max_tokens=10))
    assert engine.generate([5] * 20, SamplingParams(max_tokens=4))[0].finish_reason


def test_one_bad_prompt_in_a_batch_queues_nothing(tiny_llama):
    engine = _engine(tiny_llama, max_model_len=128)
    with pytest.raises(ValueError):
        engine.generate(["fine", "word " * 200], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
