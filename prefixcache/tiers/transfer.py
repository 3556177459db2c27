"""Copies of KV blocks out of and into the device pools.

Every device pool has the paged layout ``[num_blocks, block_size, kv_heads, head_dim]``
per layer, as a list of ``(k, v)`` pairs. A copy of ``n`` blocks has the shape
``[num_layers, 2, n, block_size, kv_heads, head_dim]`` (``KVChunk.data``).

On CUDA, copies run inside ``copying()`` on a side stream: it first waits for the
compute stream (the KV it reads was written there, and the blocks it overwrites may
still be read there), and the compute stream then waits on an event recorded after the
copies, so every later kernel sees their result while the CPU never blocks. Copies a
tier makes inside the same block (e.g. into pinned host memory) are ordered with them.
On CPU every copy is a synchronous tensor copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


class KVTransfer:
    """Reads and writes blocks of the device pools ``device_layers``."""

    def __init__(self, device_layers: KVLayers) -> None:
        self.device_layers = device_layers
        self.device = device_layers[0][0].device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One K or V block as copies hold it: ``(block_size, kv_heads, row)``."""
        return tuple(self.device_layers[0][0].shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the pools and of every copy."""
        return self.device_layers[0][0].dtype

    def copy_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape of a copy of ``num_blocks`` blocks."""
        return (len(self.device_layers), 2, num_blocks, *self.block_shape)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K and V over all layers."""
        return math.prod(self.copy_shape(1)) * self.device_layers[0][0].element_size()

    def read(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy ``[layers, 2, n, ...]`` of device blocks ``block_ids``, on the device."""
        k0 = self.device_layers[0][0]
        out = torch.empty(
            (len(self.device_layers), 2, len(block_ids), *k0.shape[1:]),
            dtype=k0.dtype,
            device=self.device,
        )
        runs = _runs(block_ids)
        if not runs:
            return out
        # A sequence's blocks are mostly reserved together: one run is a plain slice.
        index = _index(block_ids, self.device) if len(runs) > 1 else None
        for layer, pools in enumerate(self.device_layers):
            for kv, pool in enumerate(pools):
                if index is None:
                    _, first, end = runs[0]
                    out[layer, kv].copy_(pool[first:end])
                else:
                    torch.index_select(pool, 0, index, out=out[layer, kv])
        return out

    def write(self, data: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Copy ``data`` (``[layers, 2, n, ...]``, on the CPU or the device) into device
        blocks ``block_ids``."""
        if not block_ids:
            return
        # Pageable CPU memory is staged before ``to`` returns, so the caller may drop it.
        moved = data.to(self.device, non_blocking=True)
        dst = _index(block_ids, self.device)
        for layer, (k, v) in enumerate(self.device_layers):
            _bytes(k).index_copy_(0, dst, _bytes(moved[layer, 0]))
            _bytes(v).index_copy_(0, dst, _bytes(moved[layer, 1]))

    def copying(self) -> contextlib.AbstractContextManager:
        """The scope copies run in: the side stream on CUDA, nothing special on CPU."""
        if self.stream is None:
            return contextlib.nullcontext()
        return _SideStream(self.stream, self.device)


class _SideStream:
    """Run copies on ``stream`` ordered after the compute stream, and order it after them."""

    def __init__(self, stream: torch.cuda.Stream, device: torch.device) -> None:
        self.stream, self.device = stream, device
        self._context = torch.cuda.stream(stream)

    def __enter__(self) -> None:
        self.compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(self.compute)
        self._context.__enter__()

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
        done = torch.cuda.Event()
        done.record(self.stream)
        self.compute.wait_event(done)


def _bytes(pool: torch.Tensor) -> torch.Tensor:
    """One-byte pools (int8/fp8 KV) as bytes: torch has no ``index_copy_`` for float8."""
    return pool.view(torch.uint8) if pool.element_size() == 1 else pool


def _index(ids: Sequence[int], device) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.int64, device=device)


def _runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split ``ids`` into runs of consecutive ids: (offset in ``ids``, first id, end id)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append((start, ids[start], ids[i - 1] + 1))
            start = i
    return runs
