"""Qwen2: the Llama decoder with biases on the q, k and v projections."""

from dataclasses import replace

from prefixcache.models.config import ModelConfig
from prefixcache.models.llama import LlamaForCausalLM
from prefixcache.models.registry import register_model


def _with_qkv_bias(config: ModelConfig) -> ModelConfig:
    return replace(config, attention_bias=True)


register_model("Qwen2ForCausalLM", adapt_config=_with_qkv_bias)(LlamaForCausalLM)
