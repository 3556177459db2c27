"""Builds an engine from its configuration: weights, KV pools, cache, tiers, tokenizer.

``build_engine`` is the one place that knows how the parts fit together; the core, the
input processor and the limits it returns know nothing of how they were made.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels import get_backend
from prefixcache.cache.block_manager import BlockManager
from prefixcache.cache.events import CacheEvents
from prefixcache.cache.kv_cache import KVCache, bytes_per_token
from prefixcache.config import EngineConfig
from prefixcache.engine.core import EngineCore
from prefixcache.engine.model_runner import ModelRunner
from prefixcache.engine.sizing import (
    default_batched_tokens,
    default_device,
    resolve_kv_cache_tokens,
    resolve_max_model_len,
)
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.processor import InputProcessor
from prefixcache.inputs.tokenizer import eos_token_ids, load_tokenizer
from prefixcache.models.config import ModelConfig
from prefixcache.models.fingerprint import model_fingerprint
from prefixcache.models.loader import load_model, resolve_dtype, resolve_model_path
from prefixcache.tiers.tiered import build_tiers


class BuiltEngine(NamedTuple):
    """What ``build_engine`` makes: the core, the input processor for it, its limits."""

    core: EngineCore
    inputs: InputProcessor
    limits: EngineLimits
    model_config: ModelConfig


def resolve_config(
    model: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_model_len: int | None = None,
    kv_cache_tokens: int | None = None,
    max_num_batched_tokens: int | None = None,
    **options,
) -> EngineConfig:
    """An ``EngineConfig`` with every default resolved for ``model`` and the device."""
    folder = resolve_model_path(model)
    model_config = ModelConfig.from_folder(folder)
    device = torch.device(device or default_device())
    torch_dtype = resolve_dtype(dtype, device, model_config)
    max_len = resolve_max_model_len(model_config, max_model_len)
    kv_tokens = resolve_kv_cache_tokens(
        kv_cache_tokens, bytes_per_token(model_config, torch_dtype), max_len, device
    )
    return EngineConfig(
        model=str(folder),
        device=str(device),
        dtype=str(torch_dtype).removeprefix("torch."),
        max_model_len=max_len,
        kv_cache_tokens=kv_tokens,
        max_num_batched_tokens=max_num_batched_tokens or default_batched_tokens(device),
        **options,
    )


def build_engine(config: EngineConfig) -> BuiltEngine:
    """Load the model and tokenizer of ``config`` and assemble an engine core over them."""
    folder = config.model_path
    model_config = ModelConfig.from_folder(folder)
    device = torch.device(config.device)
    dtype = resolve_dtype(config.dtype, device, model_config)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, model_config, dtype, device, config.load_format)
    kv_cache = KVCache(model_config, config.num_kv_blocks, config.block_size, dtype, device)
    runner = ModelRunner(model, kv_cache, get_backend(config.attention_backend, device), device)
    fingerprint = model_fingerprint(
        folder, model_config.architecture, str(dtype), config.load_format
    )
    events = CacheEvents()  # one log for the device cache and the tiers
    blocks = BlockManager(
        config.num_kv_blocks,
        config.block_size,
        config.chunk_size,
        fingerprint,
        config.enable_prefix_caching,
        tiers=build_tiers(config, kv_cache, fingerprint, events),
        events=events,
    )
    eos = eos_token_ids(folder, tokenizer, model_config.eos_token_ids)
    core = EngineCore(config, runner, blocks, tokenizer, eos)
    limits = _limits(config, model_config, fingerprint, str(dtype), runner.backend.name)
    return BuiltEngine(core, InputProcessor(tokenizer, limits), limits, model_config)


def _limits(
    config: EngineConfig, model_config: ModelConfig, fingerprint: str, dtype: str, backend: str
) -> EngineLimits:
    disk = config.disk_cache_dir
    return EngineLimits(
        model=config.model,
        vocab_size=model_config.vocab_size,
        max_model_len=config.max_model_len,
        block_size=config.block_size,
        chunk_size=config.chunk_size,
        kv_cache_tokens=config.kv_cache_tokens,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        prefix_caching=config.enable_prefix_caching,
        fingerprint=fingerprint,
        device=config.device,
        dtype=dtype.removeprefix("torch."),
        attention_backend=backend,
        host_cache_tokens=config.host_cache_tokens,
        disk_cache_dir=None if disk is None else str(disk),
    )
