"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys."""

from dataclasses import replace

from prefixcache.models.config import ModelConfig
from prefixcache.models.llama import LlamaForCausalLM
from prefixcache.models.registry import register_model


def _with_qk_norm(config: ModelConfig) -> ModelConfig:
    return replace(config, qk_norm=True)


register_model("Qwen3ForCausalLM", adapt_config=_with_qk_norm)(LlamaForCausalLM)
