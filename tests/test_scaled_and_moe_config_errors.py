"""Bad or unsupported RoPE and expert settings fail with errors naming the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixcache.models import resolve_model
from prefixcache.models.config import ModelConfig
from prefixcache.models.loader import load_model


def _raw(arch: str = "LlamaForCausalLM", **fields) -> dict:
    raw = {"architectures": [arch], "vocab_size": 32, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "max_position_embeddings": 4096}  # fmt: skip
    return {**raw, **fields}


def _rope(**params) -> dict:
    return {"rope_parameters": {"rope_theta": 10000.0, **params}}


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
LONG = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 1024}  # fmt: skip
EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

BAD_CONFIGS = {
    "unknown rope type": (_raw(**_rope(rope_type="su")), r"rope_type 'su' is not supported"),
    "factor below one": (_raw(**_rope(**{**YARN, "factor": 0.5})), r"factor must be >= 1"),
    "factor not a number": (_raw(**_rope(**{**YARN, "factor": "4"})), r"factor must be a finite"),
    "dynamic without factor": (_raw(**_rope(rope_type="dynamic")), r"factor is required"),
    "beta_fast <= beta_slow": (
        _raw(**_rope(**YARN, beta_fast=1.0, beta_slow=2.0)),
        r"beta_fast \(1.0\) must be greater than beta_slow",
    ),
    "negative attention_factor": (
        _raw(**_rope(**YARN, attention_factor=-1.0)),
        r"attention_factor must be positive",
    ),
    "bad original length": (
        _raw(**_rope(**{**YARN, "original_max_position_embeddings": -5})),
        r"original_max_position_embeddings must be a positive integer",
    ),
    "short_factor wrong length": (
        _raw(**_rope(**{**LONG, "short_factor": [1.0] * 7})),
        r"short_factor must be a list of head_dim / 2 = 8 numbers",
    ),
    "long_factor missing": (
        _raw(**_rope(**{k: v for k, v in LONG.items() if k != "long_factor"})),
        r"long_factor must be a list",
    ),
    "zero long factor": (
        _raw(**_rope(**{**LONG, "long_factor": [0.0] * 8})),
        r"long_factor must be positive",
    ),
    "partial rotary": (_raw(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not"),
    "top-k above experts": (
        _raw("Qwen3MoeForCausalLM", **{**EXPERTS, "num_experts_per_tok": 5}),
        r"num_experts_per_tok \(5\) exceeds num_experts \(4\)",
    ),
    "experts not an integer": (
        _raw("MixtralForCausalLM", num_local_experts="8"),
        r"num_experts must be an integer",
    ),
    "zero expert size": (
        _raw("Qwen3MoeForCausalLM", **{**EXPERTS, "moe_intermediate_size": 0}),
        r"moe_intermediate_size must be an integer >= 1",
    ),
    "zero sparse step": (
        _raw("Qwen2MoeForCausalLM", **EXPERTS, decoder_sparse_step=0),
        r"decoder_sparse_step must be an integer >= 1",
    ),
    "dense layer out of range": (
        _raw("Qwen3MoeForCausalLM", **EXPERTS, mlp_only_layers=[2]),
        r"mlp_only_layers must list layer indices below num_hidden_layers \(2\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_value_is_named_with_the_architecture(case):
    raw, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message) as error:
        ModelConfig.from_dict(raw)
    assert raw["architectures"][0] in str(error.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw("Qwen3MoeForCausalLM"), r"Qwen3MoeForCausalLM: config.json has no num_experts"),
        (
            _raw("Qwen2MoeForCausalLM", **EXPERTS),
            r"Qwen2MoeForCausalLM: shared_expert_intermediate_size must be > 0",
        ),
    ],
)
def test_expert_layout_the_architecture_cannot_have_is_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        resolve_model(ModelConfig.from_dict(raw))


def _broken_copy(source, folder, edit):
    shutil.copytree(source, folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    config = ModelConfig.from_folder(folder)
    return lambda: load_model(folder, config, torch.float32, torch.device("cpu"), "auto")


def test_missing_expert_weight_is_named(tiny_model_factory, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    load = _broken_copy(tiny_model_factory("mixtral"), tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing 1 weights: {name.replace('.', '[.]')}"):
        load()


def test_expert_beyond_the_config_is_named(tiny_model_factory, tmp_path):
    def add_expert(tensors):
        source = "model.layers.0.mlp.experts.3.gate_proj.weight"
        tensors["model.layers.0.mlp.experts.7.gate_proj.weight"] = tensors[source].clone()

    load = _broken_copy(tiny_model_factory("qwen3_moe"), tmp_path / "m", add_expert)
    with pytest.raises(ValueError, match=r"experts\.7\.gate_proj.*names expert 7.*has 4 experts"):
        load()


def test_phi3_older_longrope_names_are_read_as_longrope():
    for old_name in ("su", "yarn"):
        raw = _raw("Phi3ForCausalLM", **_rope(**{**LONG, "type": old_name}))
        del raw["rope_parameters"]["rope_type"]
        assert ModelConfig.from_dict(raw).rope.rope_type == "longrope"
    with pytest.raises(ValueError, match="rope_type 'su' is not supported"):
        ModelConfig.from_dict(_raw(**_rope(**{**LONG, "rope_type": "su"})))


def test_config_with_experts_loads_and_keeps_its_expert_layout(tiny_model_factory):
    folder = tiny_model_factory("qwen2_moe")
    raw = json.loads((folder / "config.json").read_text())
    _, config = resolve_model(ModelConfig.from_dict(raw))
    assert config.moe.num_experts == 4 and config.moe.shared_expert_intermediate_size == 96
    assert config.attention_bias
