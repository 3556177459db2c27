"""Tests for the tiny model folders of `prefixcache.testing`."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import prefixcache.testing as testing
from prefixcache.testing import (
    ARCHITECTURES,
    IM_END,
    IM_START,
    default_model_path,
    make_tiny_model,
    tokenizer_json,
)

MULTIBYTE_TEXT = "Grüße from Zürich: café, naïve, 中文 and 日本語 🚀👍🏽 — cost 3.14 €!"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def _top2_gaps(model, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (4, 64), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).flatten()


def _tensor_names(path) -> set[str]:
    with safe_open(path / "model.safetensors", framework="pt") as weights:
        return set(weights.keys())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_arch_loads_offline_with_matching_ids(tiny_model_factory, arch):
    model, tokenizer = _load(tiny_model_factory(arch))
    config = model.config
    assert config.model_type == arch
    assert model.dtype == torch.float32
    assert config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == config.eos_token_id
    assert config.max_position_embeddings == 262144
    defaults = ARCHITECTURES[arch].defaults  # Gemma: more layers (local and global), tied
    assert (config.hidden_size, config.num_hidden_layers) == (
        64, defaults.get("num_hidden_layers", 2),
    )  # fmt: skip
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings == defaults.get("tie_word_embeddings", False)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_auto_tokenizer_encodes_like_tokenizer_json(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in (MULTIBYTE_TEXT, "  x = 12345\n\tdef f(y):\n        return y's"):
        assert tokenizer.encode(text) == raw.encode(text).ids


def test_only_qwen2_has_attention_biases(tiny_model_factory):
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert bias in _tensor_names(tiny_model_factory("qwen2"))
    assert bias not in _tensor_names(tiny_model_factory("llama"))
    assert "model.layers.0.self_attn.q_norm.weight" in _tensor_names(tiny_model_factory("qwen3"))


def test_mistral_has_no_sliding_window(tiny_model_factory):
    model, _ = _load(tiny_model_factory("mistral"))
    assert model.config.sliding_window is None


def test_tokenizer_round_trips_multibyte_text_split_across_tokens(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    ids = tokenizer.encode(MULTIBYTE_TEXT)
    assert tokenizer.decode(ids) == MULTIBYTE_TEXT
    pieces = [tokenizer.decode([token]) for token in ids]
    assert any("\ufffd" in piece for piece in pieces), "no character was split across tokens"
    assert len(tokenizer) < 1024


def test_special_tokens_encode_as_single_ids(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    ids = tokenizer.encode(f"{IM_START}user\nhi{IM_END}")
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_chatml(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🙂"},
    ]
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == chatml
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == chatml + "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"tie_word_embeddings": True})],
)
def test_greedy_top2_logit_gaps_are_large(tiny_model_factory, arch, overrides):
    model, tokenizer = _load(tiny_model_factory(arch, **overrides))
    gaps = _top2_gaps(model, len(tokenizer))
    assert gaps.median() > 0.2
    assert (gaps < 1e-3).float().mean() < 0.01
    assert gaps.min() > 1e-5


def test_config_overrides_reach_the_saved_config(tiny_model_factory):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    path = tiny_model_factory(
        "llama", num_hidden_layers=3, tie_word_embeddings=True, rope_parameters=rope
    )
    model, _ = _load(path)
    assert model.config.num_hidden_layers == 3
    assert model.config.tie_word_embeddings
    assert model.config.rope_parameters["factor"] == 2.0
    assert model.config.rope_parameters["rope_theta"] == 50000.0
    assert "lm_head.weight" not in _tensor_names(path)


def test_second_call_with_same_arguments_is_a_no_op(tmp_path):
    path = make_tiny_model(tmp_path / "m", "qwen3", seed=3)
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert make_tiny_model(path, "qwen3", seed=3) == path
    assert weights.stat().st_mtime_ns == before


def test_other_arguments_or_missing_files_rebuild(tmp_path):
    path = make_tiny_model(tmp_path / "m", "llama", seed=0)
    first = hashlib.sha256((path / "model.safetensors").read_bytes()).digest()
    make_tiny_model(path, "llama", seed=1)
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).digest() != first
    (path / "model.safetensors").unlink()
    make_tiny_model(path, "llama", seed=1)
    assert (path / "model.safetensors").is_file()


def test_same_seed_gives_same_weights(tmp_path):
    first = make_tiny_model(tmp_path / "a", "qwen2", seed=5) / "model.safetensors"
    second = make_tiny_model(tmp_path / "b", "qwen2", seed=5) / "model.safetensors"
    assert first.read_bytes() == second.read_bytes()


def test_unknown_arch_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="gpt2"):
        make_tiny_model(tmp_path / "m", "gpt2")
    assert not (tmp_path / "m").exists()


def test_tokenizer_vocab_is_the_same_in_a_fresh_process():
    script = (
        "import hashlib; from prefixcache.testing import tokenizer_json; "
        "print(hashlib.sha256(tokenizer_json().encode()).hexdigest())"
    )
    package_root = Path(testing.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=package_root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == hashlib.sha256(tokenizer_json().encode()).hexdigest()


def test_default_model_is_built_once_under_prefixcache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCACHE_HOME", str(tmp_path))
    path = default_model_path()
    assert path == tmp_path / "tiny-llama"
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    assert [child.name for child in tmp_path.iterdir()] == ["tiny-llama"]
    model, tokenizer = _load(path)
    assert model.config.model_type == "llama"


def test_default_model_replaces_a_stale_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCACHE_HOME", str(tmp_path))
    stale = tmp_path / "tiny-llama"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert default_model_path() == stale
    assert (stale / "model.safetensors").is_file()
    assert [child.name for child in tmp_path.iterdir()] == ["tiny-llama"]


def test_default_model_keeps_the_folder_of_a_process_that_won_the_race(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCACHE_HOME", str(tmp_path))
    target = tmp_path / "tiny-llama"
    build = testing.make_tiny_model
    winner_inodes = []

    def build_while_another_process_installs(path, *args, **kwargs):
        build(target, "llama", seed=0)
        winner_inodes.append((target / "model.safetensors").stat().st_ino)
        return build(path, *args, **kwargs)

    monkeypatch.setattr(testing, "make_tiny_model", build_while_another_process_installs)
    assert default_model_path() == target
    assert winner_inodes == [(target / "model.safetensors").stat().st_ino]
    assert [child.name for child in tmp_path.iterdir()] == ["tiny-llama"]


def test_cache_home_falls_back_to_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXCACHE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert testing.cache_home() == tmp_path / "prefixcache"
