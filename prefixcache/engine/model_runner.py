"""Turns a step's scheduled work into tensors, runs the model, and returns logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from kernels import AttentionBackend, AttentionMetadata
from prefixcache.cache.kv_cache import KVCache
from prefixcache.engine.forward_context import ForwardContext
from prefixcache.models.rope import longrope_salt, uses_long_factors

if TYPE_CHECKING:
    from prefixcache.engine.cuda_graphs import DecodeGraphs


class SequenceChunk(NamedTuple):
    """One sequence's share of a step: new tokens after ``num_computed`` cached ones.

    ``window_block_ids``: the sliding-window layers' blocks in a hybrid KV cache (-1
    where released: those layers never read there).
    """

    token_ids: Sequence[int]
    num_computed: int
    block_ids: Sequence[int]
    long_rope: bool = False  # LongRoPE's long factors at every position (models.rope)
    window_block_ids: Sequence[int] | None = None


class ModelRunner:
    """Owns the model, the KV pools and the attention backend for one device."""

    def __init__(
        self, model: nn.Module, kv_cache: KVCache, backend: AttentionBackend, device: torch.device
    ) -> None:
        self.model, self.kv_cache, self.backend, self.device = model, kv_cache, backend, device
        # Captured decode steps (``engine.cuda_graphs``), set by the builder where they apply.
        self.graphs: DecodeGraphs | None = None

    def uses_long_rope(self, num_prompt_tokens: int) -> bool:
        """Whether a request with this prompt runs LongRoPE's long factors throughout."""
        return uses_long_factors(self.model.config.rope, num_prompt_tokens)

    def cache_salt(self, num_prompt_tokens: int, salt: str | None) -> str | None:
        """The prefix-cache salt of a request: KV computed with other RoPE factors for
        the same tokens is kept apart (``models.rope.longrope_salt``)."""
        return longrope_salt(self.model.config.rope, num_prompt_tokens, salt)

    def on_failure(self, callback: Callable[[Exception], None]) -> None:
        """Call ``callback(error)`` if the runner fails outside a step. One process fails
        only inside ``run``, which raises: never called here (tensor-parallel runners
        call it when a worker dies)."""

    def close(self) -> None:
        """Release what the runner holds beyond its tensors (nothing, in one process)."""

    @torch.inference_mode()
    def run(self, chunks: Sequence[SequenceChunk], all_logits: bool = False) -> torch.Tensor:
        """Forward the step; logits of each chunk's last token (or of every token)."""
        if not all_logits and self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks)
        input_ids, positions, ctx = self._prepare(chunks)
        hidden = self.model(input_ids, positions, ctx)
        if not all_logits:
            last = ctx.meta.query_start_loc[1:].long() - 1
            hidden = hidden[last]
        return self.model.compute_logits(hidden)

    def _prepare(self, chunks: Sequence[SequenceChunk]):
        ids: list[int] = []
        positions: list[int] = []
        for chunk in chunks:
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.num_computed, chunk.num_computed + len(chunk.token_ids)))
        query_lens = [len(c.token_ids) for c in chunks]
        seq_lens = [c.num_computed + len(c.token_ids) for c in chunks]
        meta = self._metadata(query_lens, seq_lens, [c.block_ids for c in chunks])
        ctx = ForwardContext(
            meta, self.kv_cache.layers, self.backend, _long_rope(chunks, self.device)
        )
        if self.kv_cache.hybrid:
            # Released entries point at block 0: no kernel reads behind a window, and a
            # valid id keeps every table in bounds.
            tables = [[max(b, 0) for b in c.window_block_ids] for c in chunks]
            window_meta = self._metadata(query_lens, seq_lens, tables)
            ctx.layer_meta = {layer: window_meta for layer in self.kv_cache.window_layers}
        return _long_tensor(ids, self.device), _long_tensor(positions, self.device), ctx

    def _metadata(self, query_lens, seq_lens, tables) -> AttentionMetadata:
        return AttentionMetadata.build(
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=tables,
            block_size=self.kv_cache.block_size,
            device=self.device,
        )


def _long_rope(chunks: Sequence[SequenceChunk], device: torch.device) -> torch.Tensor | None:
    if not any(chunk.long_rope for chunk in chunks):
        return None
    flags = [chunk.long_rope for chunk in chunks for _ in chunk.token_ids]
    return torch.tensor(flags, dtype=torch.bool, device=device)


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)
