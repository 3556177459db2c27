"""Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's norms, scalings and caps.

What differs from Llama: RMSNorm scales by ``1 + weight``; each block's output is
normed again before the residual (and the feed-forward input has its own norm);
embeddings are multiplied by sqrt(hidden); queries are scaled by
``query_pre_attn_scalar**-0.5`` instead of ``head_dim**-0.5``; attention scores (Gemma 2)
and final logits are soft-capped by ``c * tanh(x / c)``; the MLP uses GELU (tanh);
local (sliding-window) layers may use their own RoPE base (Gemma 3), and Gemma 3
norms queries and keys per head. Embeddings are tied to the LM head.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from prefixcache.engine.forward_context import ForwardContext
from prefixcache.models.attention_layout import GEMMA_ACTIVATIONS
from prefixcache.models.config import ModelConfig
from prefixcache.models.layers import GatedMLP, RotaryEmbedding
from prefixcache.models.llama import Attention, LlamaForCausalLM
from prefixcache.models.parallel_layers import ParallelLMHead, VocabParallelEmbedding
from prefixcache.models.registry import register_model


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight`` (weights are stored as offsets from one)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension of ``x`` in float32, like the reference."""
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class GemmaMLP(GatedMLP):
    """The gated feed-forward with GELU in place of SiLU."""

    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__(hidden, intermediate)
        self.approximate = GEMMA_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward block."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.gelu(gate, approximate=self.approximate) * up)


class GemmaAttention(Attention):
    """Llama attention with Gemma's query scale, score cap and per-layer RoPE."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        if self.sliding_window is not None and config.local_rope is not None:
            self.rotary = RotaryEmbedding(self.head_dim, config.local_rope)
        if config.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)


class GemmaDecoderLayer(nn.Module):
    """Attention and feed-forward, each normed before and after, with residuals."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, layer)
        self.mlp = GemmaMLP(config.hidden_size, config.intermediate_size, config.hidden_activation)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext):
        """Apply one Gemma layer."""
        attended = self.self_attn(positions, self.input_layernorm(x), ctx)
        x = x + self.post_attention_layernorm(attended)
        fed = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(fed)


class GemmaModel(nn.Module):
    """Scaled embedding, Gemma layers and the final norm (``model.`` in checkpoints)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.normalizer = config.hidden_size**0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext):
        """Hidden states of the step's flat batch of tokens."""
        x = self.embed_tokens(input_ids)
        # The reference rounds the scale to the weights' dtype before multiplying.
        x = x * torch.tensor(self.normalizer, dtype=x.dtype)
        for layer in self.layers:
            x = layer(positions, x, ctx)
        return self.norm(x)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 text causal LM over paged KV (checkpoint names as Llama's)."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 vocabulary logits, soft-capped where the config says so."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _gemma3(config: ModelConfig) -> ModelConfig:
    return replace(config, qk_norm=True)


register_model("Gemma2ForCausalLM")(GemmaForCausalLM)
register_model("Gemma3ForCausalLM", adapt_config=_gemma3)(GemmaForCausalLM)
