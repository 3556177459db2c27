"""Models with sliding-window layers against HF transformers on the same weights (float32).

Gemma 2, Gemma 3 (text), Mistral v0.1's all-layer window and Qwen2's
``use_sliding_window`` from ``max_window_layers`` on; every prompt is longer than the
window (24 tokens) and runs whole, in chunks, and through decode steps.
"""

from __future__ import annotations

import pytest
import torch
from test_model_matches_hf import _assert_close, _hf_logits, _prompt, _runner
from transformers import AutoModelForCausalLM

from prefixcache import Engine, SamplingParams
from prefixcache.engine.model_runner import SequenceChunk
from prefixcache.models.config import ModelConfig

MODELS = {
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}),
    "mistral": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
}


@pytest.fixture(params=sorted(MODELS))
def windowed_model(request, tiny_model_factory):
    arch, overrides = MODELS[request.param]
    return tiny_model_factory(arch, **overrides)


def test_config_marks_the_windowed_layers(windowed_model):
    config = ModelConfig.from_folder(windowed_model)
    hf = AutoModelForCausalLM.from_pretrained(windowed_model).config
    expected = tuple(
        i for i, kind in enumerate(hf.layer_types) if kind == "sliding_attention"
    ) if getattr(hf, "layer_types", None) else tuple(range(config.num_layers))  # fmt: skip
    assert config.sliding_layers == expected and expected
    assert config.sliding_window == 24


def test_prompt_longer_than_the_window_matches_hf_whole_and_in_chunks(windowed_model):
    ids = _prompt(90, 300, seed=2)
    expected = _hf_logits(windowed_model, ids)
    runner = _runner(windowed_model)
    whole = runner.run([SequenceChunk(ids, 0, [8, 1, 6, 2, 4, 5])], all_logits=True)
    _assert_close(whole, expected)
    blocks = [7, 3, 11, 2, 9, 12]  # scattered blocks on purpose
    bounds = ((0, 17), (17, 48), (48, 50), (50, 90))
    parts = [runner.run([SequenceChunk(ids[a:b], a, blocks)], all_logits=True) for a, b in bounds]
    _assert_close(torch.cat(parts), expected)


def test_decode_steps_past_the_window_match_hf(windowed_model):
    ids = _prompt(30, 300, seed=3)
    runner, blocks = _runner(windowed_model), [1, 2, 3, 4]
    logits = runner.run([SequenceChunk(ids, 0, blocks)])
    for _ in range(20):
        ids.append(int(logits[0].argmax()))
        logits = runner.run([SequenceChunk(ids[-1:], len(ids) - 1, blocks)])
    _assert_close(logits[0], _hf_logits(windowed_model, ids)[-1])


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_greedy_generation_matches_hf_token_for_token(tiny_model_factory, arch):
    folder = tiny_model_factory(arch)
    prompt = _prompt(40, 300, seed=7)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30
        )[0, len(prompt) :].tolist()
    engine = Engine.from_pretrained(
        folder, dtype="float32", max_num_batched_tokens=16, kv_cache_tokens=512
    )
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    assert engine.generate([prompt], params)[0].token_ids == ref


GEMMA3 = {
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 10,
    "hidden_size": 8,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "sliding_window": 4,
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": "wide"}, "sliding_window"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
        ({"sliding_window": None, "layer_types": ["sliding_attention"] * 2}, "sliding_window"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"query_pre_attn_scalar": -1}, "query_pre_attn_scalar"),
        ({"final_logit_softcapping": 0}, "final_logit_softcapping"),
        ({"attn_logit_softcapping": "x"}, "attn_logit_softcapping"),
        ({"sliding_window_pattern": 0, "sliding_window": 4}, "sliding_window_pattern"),
    ],
)
def test_unsupported_config_values_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**GEMMA3, **change})


def test_qwen2_window_stays_off_unless_use_sliding_window_is_set():
    raw = {**GEMMA3, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4}
    assert ModelConfig.from_dict(raw).sliding_layers == ()
    raw |= {"use_sliding_window": True, "max_window_layers": 1}
    assert ModelConfig.from_dict(raw).sliding_layers == (1,)


def test_llama_ignores_a_sliding_window_as_transformers_does():
    raw = {**GEMMA3, "architectures": ["LlamaForCausalLM"], "sliding_window": 4}
    assert ModelConfig.from_dict(raw).sliding_layers == ()
    raw["architectures"] = ["MistralForCausalLM"]
    assert ModelConfig.from_dict(raw).sliding_layers == (0, 1)
