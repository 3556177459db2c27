"""Which layers attend through a sliding window, and the Gemma 2/3 attention fields.

Read from a config.json dict the way transformers reads it:
- ``layer_types`` (a list of ``full_attention``/``sliding_attention``) wins when given;
- Qwen2/Qwen3 and their MoE variants: ``use_sliding_window`` (default false) windows
  the layers from ``max_window_layers`` on;
- Gemma 2: every other layer, starting with the first; Gemma 3: five local layers per
  global one (``sliding_window_pattern``);
- Mistral (v0.1), Mixtral and Phi-3: ``sliding_window`` applies to every layer (Llama
  ignores it, as transformers does).
Every value that is out of range, or that we do not run, raises a ValueError naming the
field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"
GEMMA_ARCHS = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_QWEN_ARCHS = (
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
# transformers windows every layer of these when the config has a sliding_window.
_EVERY_LAYER_ARCHS = ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM")
# The activations transformers names for Gemma's MLP, mapped to torch's GELU variants.
GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


def attention_fields(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` for ``ModelConfig`` from a config dict."""
    arch = (raw.get("architectures") or [""])[0]
    window = _window(raw, arch)
    layer_types = _layer_types(raw, arch, window, num_layers)
    if SLIDING not in layer_types:
        window = None
    return {"sliding_window": window, "layer_types": layer_types}


def gemma_fields(raw: dict[str, Any], parse_rope: Callable[[dict], Any]) -> dict[str, Any]:
    """Gemma's scaling, soft-caps, activation and local RoPE; {} for other architectures.

    ``parse_rope`` turns a ``{"rope_parameters": ...}`` dict into a ``RopeConfig``.
    """
    arch = (raw.get("architectures") or [""])[0]
    if arch not in GEMMA_ARCHS:
        return {}
    if raw.get("use_bidirectional_attention"):
        raise ValueError(
            f"{arch}: use_bidirectional_attention=true (the embedding variant) is not supported"
        )
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in GEMMA_ACTIVATIONS:
        raise ValueError(
            f"{arch}: unsupported hidden_activation {activation!r} "
            f"(supported: {', '.join(GEMMA_ACTIVATIONS)})"
        )
    fields = {
        "query_pre_attn_scalar": _positive(raw, "query_pre_attn_scalar", 256.0),
        "attn_logit_softcapping": _cap(raw, "attn_logit_softcapping", arch),
        "final_logit_softcapping": _cap(raw, "final_logit_softcapping", arch),
        "hidden_activation": activation,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
    }
    return fields | _gemma_ropes(raw, arch, parse_rope)


def _window(raw: dict[str, Any], arch: str) -> int | None:
    window = raw.get("sliding_window")
    if arch in _QWEN_ARCHS and not raw.get("use_sliding_window", False):
        return None
    if raw.get("use_sliding_window") is False:  # any architecture that says so
        return None
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
    return window


def _layer_types(raw, arch: str, window: int | None, num_layers: int) -> tuple[str, ...]:
    given = raw.get("layer_types")
    if given is not None:
        return _checked_layer_types(given, window, num_layers)
    if window is None:
        return (FULL,) * num_layers
    if arch in _QWEN_ARCHS:
        first = int(raw.get("max_window_layers", num_layers))
        return tuple(SLIDING if i >= first else FULL for i in range(num_layers))
    if arch in GEMMA_ARCHS:
        default = 2 if arch == "Gemma2ForCausalLM" else 6
        pattern = int(raw.get("sliding_window_pattern", default))
        if pattern < 1:
            raise ValueError(f"sliding_window_pattern must be at least 1, got {pattern}")
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
    if arch in _EVERY_LAYER_ARCHS:
        return (SLIDING,) * num_layers
    return (FULL,) * num_layers  # Llama: transformers ignores a sliding_window there


def _checked_layer_types(given, window: int | None, num_layers: int) -> tuple[str, ...]:
    if not isinstance(given, list) or len(given) != num_layers:
        raise ValueError(f"layer_types must list one entry per layer ({num_layers}), got {given!r}")
    unknown = sorted({t for t in given if t not in (FULL, SLIDING)}, key=str)
    if unknown:
        raise ValueError(
            f"unsupported layer_types entries {unknown} (supported: {FULL}, {SLIDING})"
        )
    if SLIDING in given and window is None:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    return tuple(given)


def _gemma_ropes(raw: dict[str, Any], arch: str, parse_rope) -> dict[str, Any]:
    """Global (``rope``) and local (``local_rope``) RoPE: Gemma 3 gives local layers their
    own base, ``rope_local_base_freq``, and keeps any scaling for the global layers."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full = {"rope_theta": 1_000_000.0, **(params.get(FULL) or {})}
        local = {"rope_theta": 10_000.0, **(params.get(SLIDING) or {})}
        return {"rope": parse_rope({"rope_parameters": full}),
                "local_rope": parse_rope({"rope_parameters": local})}  # fmt: skip
    if arch == "Gemma2ForCausalLM":
        return {}
    legacy = dict(raw.get("rope_scaling") or {})
    legacy.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
    local = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    return {"rope": parse_rope({"rope_parameters": legacy}),
            "local_rope": parse_rope({"rope_parameters": local})}  # fmt: skip


def _positive(raw: dict[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _cap(raw: dict[str, Any], name: str, arch: str) -> float | None:
    defaults = {"Gemma2ForCausalLM": {"attn_logit_softcapping": 50.0,
                                      "final_logit_softcapping": 30.0}}  # fmt: skip
    if name not in raw:
        return defaults.get(arch, {}).get(name)
    return None if raw[name] is None else _positive(raw, name, 0.0)
