"""Mixture-of-experts models and scaled RoPE against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from scaled_moe_variants import VARIANTS, variant_folder
from test_model_matches_hf import _assert_close, _hf_logits, _prompt, _runner
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from prefixcache import Engine, SamplingParams
from prefixcache.engine.model_runner import SequenceChunk
from prefixcache.models.config import ModelConfig
from prefixcache.models.rope import dynamic_ntk_length

# (variant, prompt length) for the whole-prompt comparison: dynamic NTK equals
# transformers' at its pinned length; LongRoPE prompts that fit the original length (32)
# run the short factors, longer ones the long factors at every position.
PROMPTS = [(name, 70) for name in sorted(VARIANTS) if name != "dynamic"] + [
    ("dynamic", 256),
    ("longrope", 32),
    ("phi3-longrope", 32),
]
# (variant, prompt length) for generation: a 24-token LongRoPE prompt generates past the
# original length, as transformers' generic decode does; Phi-3's transformers code
# recomputes everything at that step (we do not), so its prompt starts past it.
GREEDY = [(name, 24) for name in sorted(VARIANTS) if name != "phi3-longrope"] + [
    ("longrope", 40),
    ("phi3-longrope", 40),
]


def _hf_model(folder):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if hf.config.rope_parameters.get("rope_type") == "dynamic":
        _pin_dynamic(hf)
    hf.generation_config.eos_token_id = None  # generate the full length, as ignore_eos does
    return hf


def _pin_dynamic(hf) -> None:
    """transformers' own dynamic-NTK frequencies at the length we pin, held for every call
    (its generate would regrow them at each step past ``max_position_embeddings``)."""
    rope = ModelConfig.from_folder(hf.config.name_or_path).rope
    rotary = hf.model.rotary_emb
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf.config, "cpu", dynamic_ntk_length(rope))
    rotary.inv_freq, rotary.original_inv_freq, rotary.rope_type = inv_freq, inv_freq, "default"


@pytest.mark.parametrize(("name", "length"), PROMPTS)
def test_prompt_in_three_chunks_matches_hf(tiny_model_factory, name, length):
    folder = variant_folder(tiny_model_factory, name)
    ids = _prompt(length, 300, seed=7)
    runner, blocks = _runner(folder), [7, 3, 11, 2, 9, 0, 4, 12, 5, 13, 6, 14, 8, 15, 1, 10]
    cuts, long_rope = [0, length // 4, length // 2 + 3, length], runner.uses_long_rope(length)
    parts = [
        runner.run([SequenceChunk(ids[a:b], a, blocks, long_rope)], all_logits=True)
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    _assert_close(torch.cat(parts), _hf_logits(folder, ids))


@pytest.mark.parametrize(("name", "length"), GREEDY)
def test_greedy_generation_matches_hf_token_for_token(tiny_model_factory, name, length):
    folder = variant_folder(tiny_model_factory, name)
    prompt, steps = _prompt(length, 300, seed=8), 20
    with torch.no_grad():
        hf = _hf_model(folder).generate(
            torch.tensor([prompt]),
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    hf_tokens = hf.sequences[0, len(prompt) :].tolist()
    engine = Engine.from_pretrained(str(folder), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=steps, ignore_eos=True, logprobs=True)
    ours = engine.generate(prompt, params)[0]
    assert ours.token_ids == hf_tokens
    hf_logprobs = [
        torch.log_softmax(step[0].float(), -1)[token].item()
        for step, token in zip(hf.logits, hf_tokens, strict=True)
    ]
    assert ours.logprobs == pytest.approx(hf_logprobs, abs=1e-4)
