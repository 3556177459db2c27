"""Mixture-of-experts causal LMs: Mixtral, Qwen2-MoE and Qwen3-MoE.

They are the Llama decoder with ``models.moe`` feed-forward blocks. Checkpoints keep
one tensor per expert and projection (``experts.3.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.3.w1.weight``); we load each into its slice of the stacked
expert weights.
"""

from __future__ import annotations

import re
from dataclasses import replace

from prefixcache.models.config import ModelConfig
from prefixcache.models.llama import LlamaForCausalLM
from prefixcache.models.registry import register_model

_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


class MoeForCausalLM(LlamaForCausalLM):
    """The Llama causal LM with expert blocks; subclasses name the checkpoint's modules."""

    # The checkpoint's name for the feed-forward module and for an expert's gate, up and
    # down projections.
    block_name = "mlp"
    expert_projections = ("gate_proj", "up_proj", "down_proj")

    def _locate(self, name: str) -> tuple[str, object]:
        ours = name.replace(f".{self.block_name}.", ".mlp.")
        match = _EXPERT.match(ours)
        if match is None:
            return super()._locate(ours)
        prefix, expert = match["prefix"], int(match["expert"])
        experts = self.get_submodule(prefix)
        if expert >= experts.num_experts:
            raise ValueError(
                f"checkpoint tensor {name!r} names expert {expert}, but the config has "
                f"{experts.num_experts} experts"
            )
        gate, up, down = self.expert_projections
        if match["proj"] == down:
            return f"{prefix}.down_proj", expert
        if match["proj"] not in (gate, up):
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
        half = experts.gate_up_proj.shape[1] // 2
        start = 0 if match["proj"] == gate else half
        return f"{prefix}.gate_up_proj", (expert, slice(start, start + half))

    def _checkpoint_names(self):
        gate, up, down = self.expert_projections
        for name in super()._checkpoint_names():
            stacked = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
            projections = (down,) if name.endswith("down_proj") else (gate, up)
            names = [name]
            if stacked:
                prefix = name.rsplit(".", 1)[0]
                count = self.get_submodule(prefix).num_experts
                names = [f"{prefix}.{e}.{p}.weight" for e in range(count) for p in projections]
            yield from (n.replace(".mlp.", f".{self.block_name}.") for n in names)


def _require_experts(config: ModelConfig) -> ModelConfig:
    if config.moe is None:
        raise ValueError(f"{config.architecture}: config.json has no num_experts")
    return config


def _mixtral(config: ModelConfig) -> ModelConfig:
    moe = _require_experts(config).moe
    # Mixtral always renormalizes its top-k weights and has no shared expert.
    return replace(config, moe=replace(moe, norm_topk_prob=True, shared_expert_intermediate_size=0))


def _qwen2_moe(config: ModelConfig) -> ModelConfig:
    moe = _require_experts(config).moe
    if moe.shared_expert_intermediate_size <= 0:
        raise ValueError(
            f"{config.architecture}: shared_expert_intermediate_size must be > 0 "
            "(every Qwen2-MoE layer has a shared expert)"
        )
    return replace(config, attention_bias=True)


def _qwen3_moe(config: ModelConfig) -> ModelConfig:
    moe = _require_experts(config).moe
    if moe.shared_expert_intermediate_size:
        raise ValueError(f"{config.architecture}: shared_expert_intermediate_size is not used")
    return replace(config, qk_norm=True)


@register_model("MixtralForCausalLM", adapt_config=_mixtral)
class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: eight SwiGLU experts per layer named w1 (gate), w3 (up) and w2 (down)."""

    block_name = "block_sparse_moe"
    expert_projections = ("w1", "w3", "w2")


register_model("Qwen2MoeForCausalLM", adapt_config=_qwen2_moe)(MoeForCausalLM)
register_model("Qwen3MoeForCausalLM", adapt_config=_qwen3_moe)(MoeForCausalLM)
