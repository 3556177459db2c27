"""``build_tiers``: the tiers an engine config asks for, over its device KV pools."""

from __future__ import annotations

import torch

from prefixcache.cache.events import CacheEvents
from prefixcache.cache.kv_cache import KVCache
from prefixcache.config import EngineConfig
from prefixcache.models.config import ModelConfig
from prefixcache.tiers.kv_file import ChunkLayout
from prefixcache.tiers.tiered import build_tiers


def _model_config() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_layers=3,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
    )


def _engine_config(**kwargs) -> EngineConfig:
    return EngineConfig(
        model="m", device="cpu", dtype="float32", max_model_len=64, block_size=2, chunk_size=4,
        **kwargs,
    )  # fmt: skip


def test_tiers_are_built_over_the_device_pools_in_order_with_their_shapes(tmp_path):
    kv = KVCache(_model_config(), 8, 2, torch.float32, torch.device("cpu"))
    config = _engine_config(host_cache_tokens=12, disk_cache_dir=tmp_path, disk_cache_bytes=999)
    events = CacheEvents()
    tiers = build_tiers(config, kv, "model-x", events)
    host, disk = tiers.tiers
    assert (host.name, disk.name) == ("host", "disk")
    assert (tiers.block_size, tiers.chunk_size, tiers.events) == (2, 4, events)
    assert tiers.transfer.device_layers == kv.layers
    block_shape = tuple(kv.layers[0][0].shape[1:])
    chunk_shape = (3, 2, 2, *block_shape)  # layers, K and V, blocks per chunk, block
    assert host.pool.shape == (3, 2, 3, 2, *block_shape)  # 12 tokens: three chunk slots
    assert host.pool.dtype == torch.float32
    assert disk.layout == ChunkLayout("model-x", torch.float32, chunk_shape)
    assert disk.max_bytes == 999


def test_no_tiers_are_built_without_prefix_caching_or_without_a_tier_asked_for(tmp_path):
    kv = KVCache(_model_config(), 8, 2, torch.float32, torch.device("cpu"))
    assert build_tiers(_engine_config(), kv, "model-x") is None
    off = _engine_config(host_cache_tokens=12, enable_prefix_caching=False)
    assert build_tiers(off, kv, "model-x") is None
    assert build_tiers(_engine_config(host_cache_tokens=12), kv, "m").tiers[0].name == "host"
