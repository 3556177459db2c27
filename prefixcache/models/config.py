"""The architecture facts our model code needs, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixcache.models.attention_layout import attention_fields, gemma_fields
from prefixcache.models.moe import MoeConfig, parse_moe
from prefixcache.models.rope import RopeConfig, parse_rope

if TYPE_CHECKING:
    from prefixcache.models.parallel import TensorParallel

__all__ = ["ModelConfig", "MoeConfig", "RopeConfig"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A decoder-only Llama-family model's shape."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    torch_dtype: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoeConfig | None = None
    # Per layer: "full_attention" or "sliding_attention" (through ``sliding_window``).
    layer_types: tuple[str, ...] = ()
    # Gemma 2/3 (``attention_layout.gemma_fields``); None keeps the Llama behaviour.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str | None = None
    local_rope: RopeConfig | None = None  # sliding layers' RoPE where it differs

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None where it sees the whole context."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def for_rank(self, parallel: TensorParallel | None) -> ModelConfig:
        """This config with one tensor-parallel rank's query and KV head counts, to size
        that rank's KV pools; itself for one rank (``parallel`` None or of size 1)."""
        if parallel is None or parallel.size == 1:
            return self
        return replace(
            self,
            num_heads=parallel.heads_per_rank(self.num_heads),
            num_kv_heads=parallel.kv_heads_per_rank(self.num_kv_heads),
        )

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """Indices of the layers that attend through a sliding window."""
        return tuple(i for i in range(self.num_layers) if self.layer_window(i) is not None)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V elements per token over all layers (multiply by the element size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dict; raise ValueError naming what is missing."""
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            head_dim = int(raw.get("head_dim") or hidden // num_heads)
            num_layers = int(raw["num_hidden_layers"])
            fields = dict(
                architecture=archs[0],
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                rope=parse_rope(raw, head_dim, archs[0]),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
                eos_token_ids=_as_tuple(raw.get("eos_token_id")),
                moe=parse_moe(raw, archs[0]),
            )
            fields |= attention_fields(raw, num_layers)
            fields |= gemma_fields(raw, lambda sub: _sub_rope(raw, sub, head_dim, archs[0]))
            return cls(**fields)
        except KeyError as exc:
            raise ValueError(f"config.json is missing the field {exc.args[0]!r}") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        """Read ``folder/config.json``."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model folder {folder}")
        return cls.from_dict(json.loads(path.read_text()))


def _sub_rope(raw: dict[str, Any], sub: dict[str, Any], head_dim: int, arch: str) -> RopeConfig:
    """The RoPE of ``sub`` (a ``{"rope_parameters": ...}`` dict, like Gemma 3's per layer
    type), read with the rest of the model's config around it."""
    outer = {k: v for k, v in raw.items() if k not in ("rope_parameters", "rope_scaling")}
    return parse_rope(outer | sub, head_dim, arch)


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)
