"""Decode steps replayed from CUDA graphs, one per batch-size bucket.

An eager decode step of a 32-layer model launches ~900 kernels, and launching them
costs more host time than the GPU needs to run them (on an H200, 8B model, 32
sequences: ~20 ms of host time per step against ~8 ms on the GPU). A graph captured
once per batch size replays all of them with one launch.

A step of ``n`` decoding sequences runs the graph of the smallest bucket ``B >= n``:
its inputs are copied into static buffers, rows ``n..B`` are padding (slot -1, so no
KV is written; a one-token context at block 0, read and discarded). Attention in the
graph is sized for ``max_model_len``: the decode kernel's split count is fixed at
capture and splits past a sequence's length end at once, so one graph serves every
context length. Only the Triton backend's decode path is captured (its kernels read
lengths and block tables from the device); anything else runs eagerly.

On CPU there is nothing to capture; ``DecodeGraphs(capture=False)`` runs the same
static-buffer path eagerly, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from kernels import AttentionMetadata
from kernels.kv_quant import is_quantized
from prefixcache.engine.forward_context import ForwardContext

if TYPE_CHECKING:
    from prefixcache.engine.model_runner import ModelRunner, SequenceChunk

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def unsupported_reason(runner: ModelRunner) -> str | None:
    """Why the runner's decode steps cannot be captured, or None when they can."""
    if runner.device.type != "cuda":
        return "not on a CUDA device"
    config = runner.model.config
    if runner.backend.name != "triton":
        return f"the {runner.backend.name} attention backend is not captured"
    if is_quantized(runner.kv_cache.layers[0][0]):
        return "quantized KV pools are written by torch ops that padding rows would break"
    if runner.kv_cache.hybrid:
        return "a hybrid KV cache (window layers with block tables of their own)"
    if config.moe is not None:
        return "mixture-of-experts layers size their work on the host"
    if config.rope.long_factor:
        return "LongRoPE picks its factors per request"
    return None


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph | None
    logits: torch.Tensor | None  # the graph's output rows (None: run eagerly)


class DecodeGraphs:
    """Static buffers and one captured decode forward per batch-size bucket."""

    def __init__(self, runner: ModelRunner, max_seqs: int, max_model_len: int,
                 capture: bool = True) -> None:  # fmt: skip
        self.runner, self.max_model_len = runner, max_model_len
        self.capture = capture
        self.buckets = [b for b in BATCH_BUCKETS if b < max_seqs] + [max_seqs]
        largest, device = self.buckets[-1], runner.device
        self.max_blocks = math.ceil(max_model_len / runner.kv_cache.block_size)
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slots = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.starts = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.tables = torch.zeros((largest, self.max_blocks), dtype=torch.int32, device=device)
        self.graphs: dict[int, _Graph] = {}
        self.pool = None

    def capture_all(self) -> None:
        """Capture every bucket, largest first (smaller ones reuse its memory pool)."""
        for size in reversed(self.buckets):
            self.graphs[size] = self._capture(size)

    def can_run(self, chunks: Sequence[SequenceChunk]) -> bool:
        """A decode-only step this object has a bucket for."""
        return (
            0 < len(chunks) <= self.buckets[-1]
            and all(len(c.token_ids) == 1 and not c.long_rope for c in chunks)
            and all(c.num_computed < self.max_model_len for c in chunks)
        )

    def run(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Logits ``[len(chunks), vocab]`` of the step, from the bucket's graph."""
        size = next(b for b in self.buckets if b >= len(chunks))
        self._fill(chunks, size)
        entry = self.graphs.get(size)
        if entry is None:
            entry = self.graphs[size] = self._capture(size)
        if entry.graph is None:
            return self._forward(size)[: len(chunks)]
        entry.graph.replay()
        return entry.logits[: len(chunks)]

    def _fill(self, chunks: Sequence[SequenceChunk], size: int) -> None:
        """Copy the step into the static buffers; rows ``len(chunks)..size`` pad."""
        n, block_size = len(chunks), self.runner.kv_cache.block_size
        positions = np.fromiter((c.num_computed for c in chunks), np.int64, n)
        blocks = np.fromiter((c.block_ids[p // block_size] for c, p in zip(chunks, positions,
                              strict=True)), np.int64, n)  # fmt: skip
        # Blocks reserved past max_model_len's last one are never read: not copied.
        width = min(max(len(c.block_ids) for c in chunks), self.max_blocks)
        tables = np.zeros((size, width), dtype=np.int32)
        for row, chunk in zip(tables, chunks, strict=False):
            ids = chunk.block_ids[:width]
            row[: len(ids)] = ids
        host = np.zeros((4, size), dtype=np.int64)
        host[0, :n] = [c.token_ids[0] for c in chunks]
        host[1, :n] = positions
        host[2, :] = -1
        host[2, :n] = blocks * block_size + positions % block_size
        host[3, :] = 1
        host[3, :n] = positions + 1
        staged = torch.from_numpy(host).to(self.runner.device, non_blocking=True)
        self.input_ids[:size].copy_(staged[0])
        self.positions[:size].copy_(staged[1])
        self.slots[:size].copy_(staged[2])
        self.seq_lens[:size].copy_(staged[3])
        self.tables[:size, :width].copy_(torch.from_numpy(tables).to(self.runner.device))

    def _meta(self, size: int) -> AttentionMetadata:
        """Metadata over the static buffers; host-side lengths say ``max_model_len`` so
        the attention kernels are sized for any context (see the module docstring)."""
        return AttentionMetadata(
            slot_mapping=self.slots[:size], query_start_loc=self.starts[: size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.tables[:size],
            query_lens_cpu=[1] * size, seq_lens_cpu=[self.max_model_len] * size,
            block_size=self.runner.kv_cache.block_size,
        )  # fmt: skip

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        runner = self.runner
        ctx = ForwardContext(self._meta(size), runner.kv_cache.layers, runner.backend)
        hidden = runner.model(self.input_ids[:size], self.positions[:size], ctx)
        return runner.model.compute_logits(hidden)

    def _capture(self, size: int) -> _Graph:
        if not self.capture:
            return _Graph(None, None)
        self._reset_padding(size)
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the kernels, sets up cuBLAS, outside the graph
                self._forward(size)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size)
        self.pool = graph.pool()
        return _Graph(graph, logits)

    def _reset_padding(self, size: int) -> None:
        """Every row a padding row: what warm-up and capture run on."""
        self.slots[:size].fill_(-1)
        self.seq_lens[:size].fill_(1)
        self.tables[:size].zero_()
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
