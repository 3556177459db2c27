"""Broken model folders fail with errors that name the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixcache.models.config import ModelConfig
from prefixcache.models.loader import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _load(folder, load_format="auto"):
    config = ModelConfig.from_folder(folder)
    return load_model(folder, config, torch.float32, torch.device("cpu"), load_format)


def _rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_weight_is_named(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 weights: model\.layers\.1\.mlp\.up_proj"):
        _load(folder)


def test_wrong_shape_is_named(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")

    def shrink(tensors):
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = tensors[name][:8].contiguous()

    _rewrite_weights(folder, shrink)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*shape \(8, 64\), expected \(32, 64\)"):
        _load(folder)


def test_unknown_architecture_is_named(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        _load(folder)


def test_missing_weight_files_are_reported(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        _load(folder)


def test_unexpected_tensor_is_named(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'model.extra.weight' has no matching parameter"):
        _load(folder)


def test_sharded_checkpoint_loads_like_single_file(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / file)
    (folder / "model.safetensors").unlink()
    weight_map = {n: file for file, part in shards.items() for n in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, single = _load(folder), _load(tiny_llama)
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_dummy_format_needs_no_weights(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    model = _load(folder, load_format="dummy")
    assert model.lm_head.weight.std() > 0
