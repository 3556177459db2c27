"""Default sizes that depend on the model and the device."""

from __future__ import annotations

import os

import torch

from prefixcache.models.config import ModelConfig
from prefixcache.models.rope import scaled_context_length

_CPU_KV_FRACTION = 0.2
_CPU_KV_CAP_BYTES = 8 << 30
_GPU_KV_FRACTION = 0.85
_CPU_STEP_TARGET_MS = 75.0


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_max_model_len(config: ModelConfig, requested: int | None) -> int:
    """The longest prompt plus output the engine accepts."""
    limit = max(config.max_position_embeddings, scaled_context_length(config.rope))
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(
            f"max_model_len {requested} exceeds what the model supports ({limit} tokens)"
        )
    return requested


def resolve_kv_cache_tokens(
    requested: int | None,
    bytes_per_token: int,
    max_model_len: int,
    device: torch.device,
    memory: int | None = None,
) -> int:
    """KV pool size in tokens: the request, else what ``memory`` bytes hold (so a
    quantized cache fits more tokens in the same budget), else a share of the device's
    free memory."""
    if requested is not None and memory is not None:
        raise ValueError("give kv_cache_tokens or kv_cache_memory, not both")
    if requested is not None:
        return requested
    if memory is not None:
        if not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {memory!r}")
        return memory // bytes_per_token
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * _GPU_KV_FRACTION)
    else:
        budget = min(int(_total_ram() * _CPU_KV_FRACTION), _CPU_KV_CAP_BYTES)
    tokens = budget // bytes_per_token
    if device.type == "cpu":
        tokens = min(tokens, max(max_model_len, 65536))
    return tokens


def default_batched_tokens(device: torch.device) -> int:
    """Per-step token budget for chunked prefill."""
    return 8192 if device.type == "cuda" else 2048


def default_step_time_target_ms(device: torch.device) -> float:
    """The step time the adaptive prefill budget aims for (0: a fixed budget).

    On CPU a step with a 2,048-token prefill chunk takes hundreds of milliseconds, and
    every decoding stream waits for it; a target keeps their tokens flowing. A GPU
    runs the fixed budget, whose steps are already short.
    """
    return _CPU_STEP_TARGET_MS if device.type == "cpu" else 0.0


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
