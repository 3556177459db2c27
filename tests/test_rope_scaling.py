"""RoPE scalings against transformers' own RoPE code, at positions up to 256k."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from prefixcache.cache.tenants import salt_tenant
from prefixcache.engine.sizing import resolve_max_model_len
from prefixcache.models.config import ModelConfig
from prefixcache.models.layers import RotaryEmbedding
from prefixcache.models.rope import dynamic_ntk_length, longrope_salt, rope_frequencies

MAX_POSITION = 262143  # 256k positions: 0 .. 262143


def _long_factors(n: int) -> list[float]:
    return [1.0 + 40.0 * (i / (n - 1)) ** 2 for i in range(n)]


def _short_factors(n: int) -> list[float]:
    return [1.0 + 0.1 * i / n for i in range(n)]


# (head_dim, max_position_embeddings, rope_parameters): real models' shapes.
CASES = {
    "yarn-qwen3": (128, 131072, {"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 32768}),
    "yarn-deepseek-mscale": (64, 163840, {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                          "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                                          "original_max_position_embeddings": 4096}),
    "yarn-untruncated": (64, 131072, {"rope_type": "yarn", "factor": 32.0, "truncate": False,
                                      "original_max_position_embeddings": 4096}),
    "yarn-attention-factor": (128, 65536, {"rope_type": "yarn", "factor": 2.0,
                                           "attention_factor": 0.8,
                                           "original_max_position_embeddings": 32768}),
    "dynamic": (128, 32768, {"rope_type": "dynamic", "factor": 8.0}),
    "longrope-phi3": (96, 131072, {"rope_type": "longrope", "long_factor": _long_factors(48),
                                   "short_factor": _short_factors(48),
                                   "original_max_position_embeddings": 4096}),
    "llama3": (128, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "linear": (64, 16384, {"rope_type": "linear", "factor": 4.0}),
}  # fmt: skip


def _raw(case: str, theta: float = 1e6) -> dict:
    head_dim, max_pos, params = CASES[case]
    params = {**params, "rope_theta": theta}
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "intermediate_size": 8,
            "hidden_size": 4 * head_dim, "num_hidden_layers": 1, "num_attention_heads": 4,
            "head_dim": head_dim, "max_position_embeddings": max_pos,
            "rope_parameters": params}  # fmt: skip


def _configs(case: str):
    raw = _raw(case)
    hf = LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    return ModelConfig.from_dict(raw), hf


def _positions(limit: int, boundary: int = 64) -> torch.Tensor:
    """Every position near 0, ``boundary`` and ``limit``, and a spread between."""
    spread = torch.linspace(0, limit, 4099).long()
    near = [torch.arange(64), torch.arange(boundary - 8, boundary + 8), spread]
    return torch.cat([*near, torch.arange(limit - 64, limit + 1)]).unique()


def _hf_cos_sin(hf_config, positions: torch.Tensor):
    rotary = LlamaRotaryEmbedding(hf_config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None, :])
    return cos[0], sin[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_frequencies_equal_transformers_rope_init(case):
    ours_config, hf = _configs(case)
    ours = rope_frequencies(ours_config.head_dim, ours_config.rope)
    rope_type = ours_config.rope.rope_type
    seq_len = dynamic_ntk_length(ours_config.rope) if rope_type == "dynamic" else None
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len=seq_len)
    torch.testing.assert_close(ours.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert ours.attention_scaling == pytest.approx(scaling, rel=1e-12)
    if rope_type == "longrope":
        long_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=MAX_POSITION + 1)
        torch.testing.assert_close(ours.long_inv_freq, long_freq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["yarn-qwen3", "yarn-deepseek-mscale", "llama3", "linear"])
def test_cos_sin_equal_transformers_up_to_256k(case):
    ours_config, hf = _configs(case)
    positions = _positions(MAX_POSITION)
    cos, sin = RotaryEmbedding(ours_config.head_dim, ours_config.rope).cos_sin(positions)
    hf_cos, hf_sin = _hf_cos_sin(hf, positions)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)


def test_dynamic_ntk_is_pinned_at_the_full_scaled_length():
    """transformers at 8 x 32768 = 256k tokens rotates every position as we always do."""
    ours_config, hf = _configs("dynamic")
    positions = _positions(MAX_POSITION)
    assert dynamic_ntk_length(ours_config.rope) == MAX_POSITION + 1
    cos, sin = RotaryEmbedding(ours_config.head_dim, ours_config.rope).cos_sin(positions)
    hf_cos, hf_sin = _hf_cos_sin(hf, positions)  # its forward grows the base to 256k
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)


def test_longrope_uses_short_factors_before_the_original_length_and_long_after():
    ours_config, hf = _configs("longrope-phi3")
    original = ours_config.rope.original_max_position_embeddings
    positions = _positions(MAX_POSITION, boundary=original)
    cos, sin = RotaryEmbedding(ours_config.head_dim, ours_config.rope).cos_sin(positions)
    short, long = positions < original, positions >= original
    # transformers picks short factors while the sequence fits the original length...
    hf_cos, hf_sin = _hf_cos_sin(hf, positions[short])
    torch.testing.assert_close(cos[short], hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[short], hf_sin, rtol=0, atol=1e-6)
    # ... and long ones once it is longer (each decode step past it is such a call).
    hf_cos, hf_sin = _hf_cos_sin(hf, positions[long])
    torch.testing.assert_close(cos[long], hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[long], hf_sin, rtol=0, atol=1e-6)


def test_longrope_request_past_the_original_length_uses_long_factors_everywhere():
    ours_config, hf = _configs("longrope-phi3")
    positions = _positions(MAX_POSITION, boundary=4096)
    all_long = torch.ones_like(positions, dtype=torch.bool)
    rotary = RotaryEmbedding(ours_config.head_dim, ours_config.rope)
    cos, sin = rotary.cos_sin(positions, all_long)
    hf_cos, hf_sin = _hf_cos_sin(hf, positions)  # one call longer than 4096: all long
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)


def test_longrope_requests_longer_than_the_original_length_are_cached_apart():
    rope = _configs("longrope-phi3")[0].rope
    assert longrope_salt(rope, 4096, None) is None
    assert longrope_salt(rope, 4096, "acme:docs") == "acme:docs"
    long_salt = longrope_salt(rope, 4097, "acme:docs")
    assert long_salt != "acme:docs" and salt_tenant(long_salt) == "acme"
    assert salt_tenant(longrope_salt(rope, 4097, None)) == ""  # the shared tenant's
    assert longrope_salt(_configs("yarn-qwen3")[0].rope, 10**6, "acme") == "acme"


def test_yarn_and_dynamic_contexts_reach_factor_times_their_base_length():
    # Qwen3's config.json keeps 40960 beside YaRN x4 over 32768.
    shipped = ModelConfig.from_dict({**_raw("yarn-qwen3"), "max_position_embeddings": 40960})
    assert resolve_max_model_len(shipped, None) == 4 * 32768
    assert resolve_max_model_len(_configs("dynamic")[0], None) == 8 * 32768
    assert resolve_max_model_len(_configs("longrope-phi3")[0], None) == 131072
