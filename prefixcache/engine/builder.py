"""Builds an engine from its configuration: weights, KV pools, cache, tiers, tokenizer.

``build_engine`` is the one place that knows how the parts fit together; the core, the
input processor and the limits it returns know nothing of how they were made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import NamedTuple

import torch

from kernels import get_backend
from kernels.kv_quant import check_kv_cache_dtype
from prefixcache.cache.block_manager import BlockManager
from prefixcache.cache.events import CacheEvents
from prefixcache.cache.kv_cache import KVCache, bytes_per_token
from prefixcache.cache.window_blocks import WindowBlocks
from prefixcache.config import EngineConfig
from prefixcache.engine.core import EngineCore
from prefixcache.engine.cuda_graphs import DecodeGraphs, unsupported_reason
from prefixcache.engine.model_runner import ModelRunner
from prefixcache.engine.sizing import (
    default_batched_tokens,
    default_device,
    default_step_time_target_ms,
    resolve_kv_cache_tokens,
    resolve_max_model_len,
)
from prefixcache.engine.tensor_parallel.group import WorkerGroup, rank_device
from prefixcache.engine.tensor_parallel.runner import TensorParallelRunner
from prefixcache.engine.tensor_parallel.transfer import ShardedKVTransfer
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.processor import InputProcessor
from prefixcache.inputs.tokenizer import eos_token_ids, load_tokenizer
from prefixcache.models import resolve_model
from prefixcache.models.config import ModelConfig
from prefixcache.models.fingerprint import model_fingerprint
from prefixcache.models.loader import load_model, resolve_dtype, resolve_model_path
from prefixcache.models.parallel import TensorParallel, check_layout
from prefixcache.structured import GrammarCache
from prefixcache.tiers.tiered import build_tiers

logger = logging.getLogger(__name__)


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
    kv_cache_memory: int | None = None,
    step_time_target_ms: float | None = None,
    **options,
) -> EngineConfig:
    """An ``EngineConfig`` with every default resolved for ``model`` and the device.

    ``kv_cache_memory``: a byte budget for the device KV pools instead of
    ``kv_cache_tokens``; the tokens it holds depend on ``kv_cache_dtype``.
    ``step_time_target_ms``: None picks the device's default (0 turns it off).
    """
    folder = resolve_model_path(model)
    model_config = ModelConfig.from_folder(folder)
    device = torch.device(device or default_device())
    torch_dtype = resolve_dtype(dtype, device, model_config)
    max_len = resolve_max_model_len(model_config, max_model_len)
    kv_dtype = options.get("kv_cache_dtype", "auto")
    check_kv_cache_dtype(kv_dtype)
    per_token = bytes_per_token(model_config, torch_dtype, kv_dtype)
    kv_tokens = resolve_kv_cache_tokens(
        kv_cache_tokens, per_token, max_len, device, memory=kv_cache_memory
    )
    return EngineConfig(
        model=str(folder),
        device=str(device),
        dtype=str(torch_dtype).removeprefix("torch."),
        max_model_len=max_len,
        kv_cache_tokens=kv_tokens,
        max_num_batched_tokens=max_num_batched_tokens or default_batched_tokens(device),
        step_time_target_ms=(
            default_step_time_target_ms(device)
            if step_time_target_ms is None
            else step_time_target_ms
        ),
        **options,
    )


def build_engine(config: EngineConfig) -> BuiltEngine:
    """Load the model and tokenizer of ``config`` and assemble an engine core over them.

    With ``tensor_parallel_size`` N > 1 this process is rank 0 and N-1 worker processes
    are started for the other ranks (stopped again if anything here fails).
    """
    group = None
    if config.tensor_parallel_size > 1:
        _check_layout(config)  # before any process starts
        group = WorkerGroup(config)
    try:
        return _build_engine(config, group)
    except BaseException:
        if group is not None:
            group.stop()
        raise


def _build_engine(config: EngineConfig, group: WorkerGroup | None) -> BuiltEngine:
    folder = config.model_path
    model_config = ModelConfig.from_folder(folder)
    tokenizer = load_tokenizer(folder)
    runner = build_runner(config, 0, group)
    transfer = None
    if group is not None:
        group.wait_ready()
        transfer = ShardedKVTransfer(runner.kv_cache.layers, group)
    dtype = str(resolve_dtype(config.dtype, torch.device(config.device), model_config))
    fingerprint = model_fingerprint(
        folder, model_config.architecture, dtype, config.load_format,
        config.kv_cache_dtype, config.tensor_parallel_size,
    )  # fmt: skip
    events = CacheEvents()  # one log for the device cache and the tiers
    blocks = BlockManager(
        config.num_kv_blocks,
        config.block_size,
        config.chunk_size,
        fingerprint,
        config.enable_prefix_caching,
        tiers=build_tiers(config, runner.kv_cache, fingerprint, events, transfer),
        events=events,
        window=window_blocks(config, model_config),
    )
    eos = eos_token_ids(folder, tokenizer, model_config.eos_token_ids)
    grammars = GrammarCache(tokenizer, model_config.vocab_size, eos)
    core = EngineCore(config, runner, blocks, tokenizer, eos, grammars)
    limits = _limits(config, model_config, fingerprint, dtype, runner.backend.name)
    limits = replace(limits, kv_bytes_per_token=runner.kv_cache.bytes_per_token)
    inputs = InputProcessor(tokenizer, limits, grammars)
    return BuiltEngine(core, inputs, limits, model_config)


def build_runner(config: EngineConfig, rank: int, group: WorkerGroup | None = None) -> ModelRunner:
    """Rank ``rank``'s model runner: its shard of the weights and of the KV pools (all
    of them with one rank). ``group``: on rank 0 of several, the workers it drives."""
    folder = config.model_path
    model_config = ModelConfig.from_folder(folder)
    device = rank_device(config.device, rank)
    dtype = resolve_dtype(config.dtype, device, model_config)
    size = config.tensor_parallel_size
    parallel = TensorParallel(rank, size) if size > 1 else None
    model = load_model(folder, model_config, dtype, device, config.load_format, parallel)
    window = window_blocks(config, model_config)
    kv_cache = KVCache(
        model.config.for_rank(parallel), config.num_kv_blocks, config.block_size, dtype, device,
        kv_cache_dtype=config.kv_cache_dtype,
        num_window_blocks=window.pool.num_blocks if window else None,
    )  # fmt: skip
    backend = get_backend(config.attention_backend, device)
    if group is None:
        runner = ModelRunner(model, kv_cache, backend, device)
        _capture_decode_graphs(config, runner)
        return runner
    return TensorParallelRunner(model, kv_cache, backend, device, group)


def _capture_decode_graphs(config: EngineConfig, runner: ModelRunner) -> None:
    """Give the runner CUDA graphs of its decode steps, where they can be captured."""
    reason = "enforce_eager is set" if config.enforce_eager else unsupported_reason(runner)
    if reason is not None:
        logger.debug("decode steps run eagerly: %s", reason)
        return
    started = time.perf_counter()
    graphs = DecodeGraphs(runner, config.max_num_seqs, config.max_model_len)
    try:
        graphs.capture_all()
    except Exception:  # the engine still serves, eagerly; the log says why
        logger.exception("capturing CUDA graphs of decode steps failed: they run eagerly")
        return
    runner.graphs = graphs
    logger.info(
        "captured CUDA graphs of decode steps for %d batch sizes in %.1f s",
        len(graphs.buckets), time.perf_counter() - started,
    )  # fmt: skip


def _check_layout(config: EngineConfig) -> None:
    """A ``ValueError`` naming the sizes if the model cannot be split over the ranks."""
    _, resolved = resolve_model(ModelConfig.from_folder(config.model_path))
    check_layout(resolved, TensorParallel(0, config.tensor_parallel_size))


def window_blocks(config: EngineConfig, model_config: ModelConfig) -> WindowBlocks | None:
    """The sliding-window layers' own blocks for a hybrid KV cache, or None (one pool).

    Its default size holds a window (plus the block being written) for each of
    ``max_num_seqs`` decoding sequences and one prefill chunk of the step budget.
    """
    wanted, tokens = config.hybrid_kv_cache, config.window_kv_cache_tokens
    if not model_config.sliding_layers:
        if wanted:
            raise ValueError(
                f"hybrid_kv_cache=True needs sliding-window layers; "
                f"{model_config.architecture} has none"
            )
        return None
    if wanted is False or (wanted is None and config.has_kv_tiers):
        return None
    window, bs = model_config.sliding_window, config.block_size
    probe = WindowBlocks(0, bs, window)
    least = probe.max_blocks_per_step(config.max_num_batched_tokens)
    if tokens is not None:
        if tokens // bs < least:
            raise ValueError(
                f"window_kv_cache_tokens {tokens} cannot hold a window of {window} tokens "
                f"and a step of {config.max_num_batched_tokens}: it needs at least "
                f"{least * bs}"
            )
        return WindowBlocks(tokens // bs, bs, window)
    blocks = config.max_num_seqs * probe.max_blocks_per_step(1) + least
    if blocks >= config.num_kv_blocks and not wanted:
        return None  # the windows would take the whole pool: nothing to save
    return WindowBlocks(max(least, min(blocks, config.num_kv_blocks)), bs, window)


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
        kv_cache_dtype=config.kv_cache_dtype,
    )
