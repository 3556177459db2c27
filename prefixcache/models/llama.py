"""Llama-family decoder over paged KV: Llama and Mistral here, Qwen2/Qwen3 as variants."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prefixcache.engine.forward_context import ForwardContext
from prefixcache.models.config import ModelConfig
from prefixcache.models.fused import rope_tables, rotate_
from prefixcache.models.layers import RMSNorm, RotaryEmbedding
from prefixcache.models.moe import feed_forward
from prefixcache.models.parallel import current_parallel
from prefixcache.models.parallel_layers import (
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    qkv_linear,
)
from prefixcache.models.registry import register_model

# Checkpoint names that load into a slice of one of our fused parameters.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Attention(nn.Module):
    """Grouped-query self-attention with fused QKV and optional per-head q/k RMSNorm.

    Tensor-parallel: ``num_heads`` and ``num_kv_heads`` are this rank's; q/k/v are
    column-parallel and ``o_proj`` row-parallel (the one all-reduce of attention).
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        rank = config.for_rank(current_parallel())
        self.num_heads, self.num_kv_heads = rank.num_heads, rank.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = qkv_linear(
            config.hidden_size, config.num_heads, config.num_kv_heads, self.head_dim,
            bias=config.attention_bias,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(config.num_heads * self.head_dim, config.hidden_size, False)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope)
        self.sliding_window = config.layer_window(layer)
        self.softcap: float | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def shard_sizes(self) -> tuple[int, ...]:
        """Row counts of q, k, v inside the fused ``qkv_proj``."""
        return (self.q_size, self.kv_size, self.kv_size)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext):
        """Attend the step's tokens over their paged contexts."""
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.shard_sizes(), dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        cos, sin = rope_tables(self.rotary, positions, ctx)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
            rotate_(q, cos, sin)
            rotate_(k, cos, sin)
        else:  # q and k are neighbours in the fused output: one rotation for both
            heads = self.num_heads + self.num_kv_heads
            rotate_(qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim), cos, sin)
        window, cap = self.sliding_window, self.softcap
        out = ctx.attention(self.layer, q, k, v, self.scale, sliding_window=window, softcap=cap)
        return self.o_proj(out.reshape(-1, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward blocks with residuals."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = feed_forward(config.hidden_size, config.intermediate_size, config.moe, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext):
        """Apply one transformer layer."""
        x = x + self.self_attn(positions, self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (the ``model.`` prefix in checkpoints)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext):
        """Hidden states of the step's flat batch of tokens."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, ctx)
        return self.norm(x)


@register_model("LlamaForCausalLM", "MistralForCausalLM")
class LlamaForCausalLM(nn.Module):
    """A causal LM over paged KV; Qwen2 and Qwen3 differ only in their config flags."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after moves)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext):
        """Final hidden states ``[tokens, hidden]``; call ``compute_logits`` on the rows needed."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 vocabulary logits for the given hidden rows."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into our (partly fused) parameters; returns names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            target, row_slice = self._locate(name)
            if target not in params:
                if self.config.tie_word_embeddings and target == "lm_head.weight":
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            _copy_checked(name, params[target], row_slice, tensor)
            loaded.add(name if row_slice is None else f"{target}[{name}]")
        return loaded

    def expected_checkpoint_names(self) -> set[str]:
        """Every name ``load_weights`` must see for the model to be complete."""
        return set(self._checkpoint_names())

    def _checkpoint_names(self):
        for name, _ in self.named_parameters():
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            fused = [key for key, (target, _) in _FUSED.items() if f".{target}." in name]
            if not fused:
                yield name
            for key in fused:
                yield name.replace(_FUSED[key][0], key)

    def _locate(self, name: str) -> tuple[str, slice | None]:
        for key, (target, shard) in _FUSED.items():
            if f".{key}." in name:
                fused_name = name.replace(key, target)
                module = self.get_submodule(fused_name.rsplit(".", 2)[0])
                return fused_name, _shard_rows(module, target, shard)
        return name, None


def _shard_rows(module: nn.Module, target: str, shard: int) -> slice:
    if target == "qkv_proj":
        sizes = module.shard_sizes()
    else:
        half = module.gate_up_proj.out_features // 2
        sizes = (half, half)
    start = sum(sizes[:shard])
    return slice(start, start + sizes[shard])


def _copy_checked(name: str, param: torch.Tensor, rows: slice | None, tensor: torch.Tensor):
    dest = param.data if rows is None else param.data[rows]
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(dest.shape)}"
        )
    dest.copy_(tensor.to(dest.dtype))
