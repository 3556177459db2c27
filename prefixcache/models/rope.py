"""Rotary embedding scalings: their parameters, read from config.json, and their frequencies.

Every scaling here gives each position frequencies that depend on that position only,
never on how long the sequence is when it is computed, so a cached K stays valid for
any later request that shares the prefix (hit == miss):

- ``dynamic`` (NTK): transformers recomputes the base from the current sequence length
  on every forward call past ``max_position_embeddings`` (and keeps the older keys as
  they were), so its KV depends on how the sequence was split into calls. We pin the
  base at ``factor * max_position_embeddings`` tokens, the value transformers reaches at
  the full scaled length (vLLM makes the same choice).
- ``longrope``: transformers takes the long factors for every position of a forward
  call once the sequence is longer than ``original_max_position_embeddings``, the
  short ones before. We choose per request, by its prompt: a prompt longer than the
  original length runs with the long factors at every position (as transformers
  computes it), and its KV is cached apart from short-factor KV, under its own cache
  salt (``longrope_salt``), so neither is ever reused for the other. A shorter prompt
  uses the short factors, and the long ones from the original length on, which is what
  transformers' generic decode computes (each step is its own call, earlier keys are
  kept). Phi-3 in transformers instead recomputes the whole sequence with the long
  factors at that step; we do not, so such a generation differs from it past there.
- ``yarn``: static frequencies and an attention factor that scales cos and sin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters (``rope_type`` is one of ``ROPE_TYPES``)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 8192
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


class RopeFrequencies(NamedTuple):
    """Inverse frequencies per position range, and the factor applied to cos and sin.

    Positions ``>= long_from`` use ``long_inv_freq`` when it is set (LongRoPE).
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    long_inv_freq: torch.Tensor | None = None
    long_from: int = 0


def parse_rope(raw: dict[str, Any], head_dim: int, architecture: str) -> RopeConfig:
    """Read the RoPE parameters of a config.json dict; ValueError naming a bad field."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if architecture == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # transformers' Phi-3 reads both older names as LongRoPE
    where = f"{architecture}: rope_parameters"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{where}.rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    partial = raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{architecture}: partial_rotary_factor={partial} is not supported")
    max_pos = int(raw.get("max_position_embeddings", 4096))
    original = _original_length(raw, params, max_pos, where)
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope = RopeConfig(
        theta=_positive(theta, where, "rope_theta"),
        rope_type=rope_type,
        factor=_factor(params, rope_type, max_pos, original, where),
        low_freq_factor=_number(params.get("low_freq_factor", 1.0), where, "low_freq_factor"),
        high_freq_factor=_number(params.get("high_freq_factor", 4.0), where, "high_freq_factor"),
        original_max_position_embeddings=original,
        max_position_embeddings=max_pos,
        attention_factor=_optional_positive(params, "attention_factor", where),
        beta_fast=_number(params.get("beta_fast") or 32.0, where, "beta_fast"),
        beta_slow=_number(params.get("beta_slow") or 1.0, where, "beta_slow"),
        mscale=_optional_positive(params, "mscale", where),
        mscale_all_dim=_optional_positive(params, "mscale_all_dim", where),
        truncate=bool(params.get("truncate", True)),
        short_factor=_factor_list(params, "short_factor", rope_type, head_dim, where),
        long_factor=_factor_list(params, "long_factor", rope_type, head_dim, where),
    )
    _check_ranges(rope, where)
    return rope


def _original_length(raw, params, max_pos: int, where: str) -> int:
    # Phi-3 keeps the pretraining length beside rope_scaling; transformers prefers it.
    value = raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings"
    )
    if value is None:
        return max_pos  # transformers' default for every scaling that reads it
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"{where}.original_max_position_embeddings must be a positive integer, got {value!r}"
        )
    return value


def _factor(params, rope_type: str, max_pos: int, original: int, where: str) -> float:
    factor = params.get("factor")
    if factor is None:
        if rope_type in ("linear", "dynamic"):
            raise ValueError(f"{where}.factor is required for rope_type {rope_type!r}")
        if rope_type in ("yarn", "longrope"):
            return max_pos / original  # transformers' fallback: the context's growth
        return 1.0
    factor = _number(factor, where, "factor")
    if factor < 1.0:
        raise ValueError(f"{where}.factor must be >= 1, got {factor}")
    return factor


def _factor_list(params, key: str, rope_type: str, head_dim: int, where: str):
    if rope_type != "longrope":
        return ()
    values = params.get(key)
    if not isinstance(values, list) or len(values) != head_dim // 2:
        raise ValueError(
            f"{where}.{key} must be a list of head_dim / 2 = {head_dim // 2} numbers, "
            f"got {values!r}"
        )
    return tuple(_positive(v, where, key) for v in values)


def _check_ranges(rope: RopeConfig, where: str) -> None:
    if rope.rope_type == "yarn" and rope.beta_fast <= rope.beta_slow:
        raise ValueError(
            f"{where}.beta_fast ({rope.beta_fast}) must be greater than "
            f"beta_slow ({rope.beta_slow})"
        )
    if rope.rope_type == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
        raise ValueError(
            f"{where}.high_freq_factor ({rope.high_freq_factor}) must be greater than "
            f"low_freq_factor ({rope.low_freq_factor})"
        )


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _positive(value: Any, where: str, key: str) -> float:
    number = _number(value, where, key)
    if number <= 0:
        raise ValueError(f"{where}.{key} must be positive, got {value!r}")
    return number


def _optional_positive(params: dict[str, Any], key: str, where: str) -> float | None:
    value = params.get(key)
    return None if value is None else _positive(value, where, key)


def rope_frequencies(head_dim: int, rope: RopeConfig) -> RopeFrequencies:
    """The inverse frequencies and attention scaling for ``rope.rope_type`` (on the CPU,
    also while a model is built on the meta device)."""
    with torch.device("cpu"):
        return _frequencies(head_dim, rope)


def _frequencies(head_dim: int, rope: RopeConfig) -> RopeFrequencies:
    inv_freq = _base_inv_freq(head_dim, rope.theta)
    if rope.rope_type == "linear":
        return RopeFrequencies(inv_freq / rope.factor)
    if rope.rope_type == "llama3":
        return RopeFrequencies(_llama3_inv_freq(inv_freq, rope))
    if rope.rope_type == "dynamic":
        return RopeFrequencies(_dynamic_inv_freq(head_dim, rope))
    if rope.rope_type == "yarn":
        return _yarn(head_dim, rope)
    if rope.rope_type == "longrope":
        return _longrope(head_dim, rope)
    return RopeFrequencies(inv_freq)


def _base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.x scaling: long wavelengths slowed by ``factor``, short ones kept, smooth between."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def dynamic_ntk_length(rope: RopeConfig) -> int:
    """The sequence length whose NTK base we pin: ``factor * max_position_embeddings``."""
    return int(rope.factor * rope.max_position_embeddings)


def scaled_context_length(rope: RopeConfig) -> int:
    """The context a scaling is made for, beyond ``max_position_embeddings`` (0 if none).

    YaRN stretches the pretraining length by ``factor``; dynamic NTK is pinned at
    ``factor * max_position_embeddings``. Other types state their reach in
    ``max_position_embeddings`` itself.
    """
    if rope.rope_type == "yarn":
        return int(rope.factor * rope.original_max_position_embeddings)
    if rope.rope_type == "dynamic":
        return dynamic_ntk_length(rope)
    return 0


LONGROPE_SALT = "longrope-long"


def uses_long_factors(rope: RopeConfig, num_prompt_tokens: int) -> bool:
    """Whether a request with this prompt runs LongRoPE's long factors at every position."""
    return (
        rope.rope_type == "longrope" and num_prompt_tokens > rope.original_max_position_embeddings
    )


def longrope_salt(rope: RopeConfig, num_prompt_tokens: int, salt: str | None) -> str | None:
    """The cache salt of a request: ``salt`` itself, or for a long-factor LongRoPE prompt
    a salt of the same tenant (``TENANT:...``) that keeps its KV apart."""
    if not uses_long_factors(rope, num_prompt_tokens):
        return salt
    return f"{salt or ''}:{LONGROPE_SALT}"


def _dynamic_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    ratio = rope.factor * dynamic_ntk_length(rope) / rope.max_position_embeddings
    base = rope.theta * (ratio - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq(head_dim, base)


def _yarn(head_dim: int, rope: RopeConfig) -> RopeFrequencies:
    """YaRN: interpolate slow dimensions, keep fast ones, ramp between; scale attention."""
    pos_freqs = rope.theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    low, high = _yarn_correction_range(head_dim, rope)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return RopeFrequencies(inv_freq, _yarn_attention_factor(rope))


def _yarn_correction_range(head_dim: int, rope: RopeConfig) -> tuple[float, float]:
    def dim_of(rotations: float) -> float:
        length = rope.original_max_position_embeddings
        return head_dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def _yarn_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


def _longrope(head_dim: int, rope: RopeConfig) -> RopeFrequencies:
    original = rope.original_max_position_embeddings
    scaling = rope.attention_factor
    if scaling is None:
        factor = rope.factor
        scaling = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base = rope.theta**shape
    short = 1.0 / (torch.tensor(rope.short_factor, dtype=torch.float32) * base)
    long = 1.0 / (torch.tensor(rope.long_factor, dtype=torch.float32) * base)
    return RopeFrequencies(short, scaling, long, original)
