"""The Qwen3-MoE shape of bench/tiny_models.py is a config our engine accepts.

(Running bench/long_prompt.py on it takes minutes; the README reports such a run.)"""

from __future__ import annotations

import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tiny_models  # noqa: E402

from prefixcache.engine.sizing import resolve_max_model_len  # noqa: E402
from prefixcache.models import resolve_model  # noqa: E402
from prefixcache.models.config import ModelConfig  # noqa: E402


def test_qwen3_moe_bench_shape_is_accepted_with_its_experts_and_yarn():
    arch, overrides = tiny_models.SHAPES["qwen3-moe"]
    hf_config = transformers.Qwen3MoeConfig(**overrides, vocab_size=768)
    raw = {**hf_config.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}
    _, config = resolve_model(ModelConfig.from_dict(raw))
    assert arch == "qwen3_moe" and config.qk_norm
    assert (config.moe.num_experts, config.moe.top_k, config.moe.norm_topk_prob) == (64, 8, True)
    assert config.rope.rope_type == "yarn"
    assert resolve_max_model_len(config, None) == 131072
