"""Phi-3: the Llama decoder with q/k/v and gate/up already fused in the checkpoint.

Its long-context versions use LongRoPE (``models.rope``). Phi-4-mini's partial rotary
embedding (``partial_rotary_factor`` < 1) is refused by the config parser.
"""

from prefixcache.models.llama import LlamaForCausalLM
from prefixcache.models.registry import register_model


@register_model("Phi3ForCausalLM")
class Phi3ForCausalLM(LlamaForCausalLM):
    """Checkpoint names are our parameter names: ``qkv_proj`` and ``gate_up_proj`` whole."""

    def _checkpoint_names(self):
        for name, _ in self.named_parameters():
            if not (self.config.tie_word_embeddings and name == "lm_head.weight"):
                yield name
