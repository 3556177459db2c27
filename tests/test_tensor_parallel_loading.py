"""Each tensor-parallel rank's weights are its slices of the whole checkpoint.

Loading needs no process group (the collectives run only in the forward pass), so the
ranks of a 2-way layout are loaded here one after the other and compared with the
one-rank model, slice by slice.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixcache.models.config import ModelConfig
from prefixcache.models.loader import load_model
from prefixcache.models.parallel import TensorParallel
from prefixcache.testing import make_tiny_model

# Phi-3 keeps q/k/v and gate/up fused in the checkpoint; one KV head is replicated on
# both ranks; 251 rows leave rank 1 one row of padding.
_SHAPE = {
    "num_key_value_heads": 1,
    "vocab_size": 251,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_HEAD_DIM, _INTERMEDIATE, _VOCAB_PER_RANK = 16, 128, 126


def _load(folder, parallel=None):
    config = ModelConfig.from_folder(folder)
    return load_model(folder, config, torch.float32, torch.device("cpu"), "auto", parallel)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tp-load") / "phi3", "phi3", **_SHAPE)


@pytest.fixture(scope="module")
def whole(phi3):
    return dict(_load(phi3).named_parameters())


@pytest.mark.parametrize("rank", [0, 1])
def test_attention_shards_are_the_rank_heads_and_the_kv_head_they_use(phi3, whole, rank):
    shard = dict(_load(phi3, TensorParallel(rank, 2)).named_parameters())
    prefix = "model.layers.1.self_attn."
    qkv = whole[prefix + "qkv_proj.weight"]
    q = qkv[rank * 2 * _HEAD_DIM : (rank + 1) * 2 * _HEAD_DIM]
    k, v = qkv[4 * _HEAD_DIM : 5 * _HEAD_DIM], qkv[5 * _HEAD_DIM :]  # the one KV head
    assert torch.equal(shard[prefix + "qkv_proj.weight"], torch.cat([q, k, v]))
    cols = slice(rank * 2 * _HEAD_DIM, (rank + 1) * 2 * _HEAD_DIM)
    assert torch.equal(shard[prefix + "o_proj.weight"], whole[prefix + "o_proj.weight"][:, cols])


@pytest.mark.parametrize("rank", [0, 1])
def test_mlp_shards_are_the_rank_slice_of_gate_up_and_down(phi3, whole, rank):
    shard = dict(_load(phi3, TensorParallel(rank, 2)).named_parameters())
    prefix, half = "model.layers.0.mlp.", _INTERMEDIATE // 2
    gate_up = whole[prefix + "gate_up_proj.weight"]
    rows = [
        slice(p * _INTERMEDIATE + rank * half, p * _INTERMEDIATE + (rank + 1) * half)
        for p in (0, 1)
    ]
    expected = torch.cat([gate_up[rows[0]], gate_up[rows[1]]])
    assert torch.equal(shard[prefix + "gate_up_proj.weight"], expected)
    down = whole[prefix + "down_proj.weight"][:, rank * half : (rank + 1) * half]
    assert torch.equal(shard[prefix + "down_proj.weight"], down)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_vocabulary_shards_are_padded_row_slices(phi3, whole, name):
    first = dict(_load(phi3, TensorParallel(0, 2)).named_parameters())[name]
    second = dict(_load(phi3, TensorParallel(1, 2)).named_parameters())[name]
    assert first.shape == second.shape == (_VOCAB_PER_RANK, whole[name].shape[1])
    assert torch.equal(first, whole[name][:_VOCAB_PER_RANK])
    assert torch.equal(second[:-1], whole[name][_VOCAB_PER_RANK:])
    assert not second[-1].any()  # the padding row


def test_norms_are_replicated(phi3, whole):
    shard = dict(_load(phi3, TensorParallel(1, 2)).named_parameters())
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(shard[name], whole[name])


def _rewrite(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_checkpoint_tensor_of_the_wrong_shape_is_named(phi3, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"

    def narrow(tensors):
        tensors[name] = tensors[name][:, :-2].contiguous()

    folder = _rewrite(phi3, tmp_path / "narrow", narrow)
    with pytest.raises(ValueError, match=rf"{name}' has shape \(64, 126\), expected \(64, 128\)"):
        _load(folder, TensorParallel(0, 2))


def test_a_missing_checkpoint_tensor_is_named(phi3, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    folder = _rewrite(phi3, tmp_path / "missing", lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match=rf"missing 1 weights: {name}"):
        _load(folder, TensorParallel(1, 2))
