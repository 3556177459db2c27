"""The in-place rotary embedding of ``models.fused`` against ``layers.RotaryEmbedding``."""

from __future__ import annotations

import torch

from kernels import AttentionMetadata
from prefixcache.engine.forward_context import ForwardContext
from prefixcache.models.fused import rope_tables, rotate_
from prefixcache.models.layers import RotaryEmbedding
from prefixcache.models.rope import RopeConfig


def _context() -> ForwardContext:
    meta = AttentionMetadata.build([5], [5], [[0]], 16)
    return ForwardContext(meta=meta, kv_caches=[], backend=None)


def test_in_place_rotation_gives_the_same_bits_as_the_rotary_module():
    rope = RopeConfig(theta=500000.0, rope_type="yarn", factor=4.0, attention_factor=1.2)
    rotary = RotaryEmbedding(64, rope)
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 7, 8000, 130000, 3])
    q, k = torch.randn(5, 8, 64, generator=gen), torch.randn(5, 2, 64, generator=gen)
    want_q, want_k = rotary(positions, q, k)
    cos, sin = rope_tables(rotary, positions, _context())
    rotate_(q, cos, sin)
    rotate_(k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_layers_share_tables_only_when_their_frequencies_match():
    ctx, positions = _context(), torch.arange(5)
    first = rope_tables(RotaryEmbedding(16, RopeConfig()), positions, ctx)
    assert rope_tables(RotaryEmbedding(16, RopeConfig()), positions, ctx) is first
    local = RotaryEmbedding(16, RopeConfig(theta=10.0))  # Gemma 3's local layers differ
    assert not torch.equal(rope_tables(local, positions, ctx)[0], first[0])
