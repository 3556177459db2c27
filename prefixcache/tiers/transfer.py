"""Copies of KV blocks between the device pools and host memory.

Every pool here has the paged layout ``[num_blocks, block_size, kv_heads, head_dim]``
per layer, as a list of ``(k, v)`` pairs. A gathered copy has the shape
``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``.

On CUDA the copies run on a side stream: it first waits for the compute stream (the
KV it reads was written there, and the blocks it overwrites may still be read there),
and the compute stream then waits on an event recorded after the copies, so every
later kernel sees the copied KV while the CPU never blocks. Host pools are pinned, so
the copies are real DMA transfers. On CPU every copy is a synchronous tensor copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


class KVTransfer:
    """Moves blocks of the device pools ``device_layers`` to and from host memory."""

    def __init__(self, device_layers: KVLayers) -> None:
        self.device_layers = device_layers
        self.device = device_layers[0][0].device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def device_to_host(
        self, device_ids: Sequence[int], host_layers: KVLayers, host_ids: Sequence[int]
    ) -> None:
        """Copy device blocks ``device_ids`` into host blocks ``host_ids`` (same order)."""
        if not device_ids:
            return
        if self.stream is None:
            src, dst = _index(device_ids, self.device), _index(host_ids, "cpu")
            for (dk, dv), (hk, hv) in zip(self.device_layers, host_layers, strict=True):
                hk[dst] = dk[src]
                hv[dst] = dv[src]
            return
        with self._side_stream():
            src = _index(device_ids, self.device)
            for (dk, dv), (hk, hv) in zip(self.device_layers, host_layers, strict=True):
                for pool, host in ((dk, hk), (dv, hv)):
                    gathered = pool.index_select(0, src)
                    for i, a, b in _runs(host_ids):
                        host[a:b].copy_(gathered[i : i + b - a], non_blocking=True)

    def host_to_device(
        self, host_layers: KVLayers, host_ids: Sequence[int], device_ids: Sequence[int]
    ) -> None:
        """Copy host blocks ``host_ids`` into device blocks ``device_ids`` (same order)."""
        if not device_ids:
            return
        if self.stream is None:
            src, dst = _index(host_ids, "cpu"), _index(device_ids, self.device)
            for (dk, dv), (hk, hv) in zip(self.device_layers, host_layers, strict=True):
                dk[dst] = hk[src]
                dv[dst] = hv[src]
            return
        with self._side_stream():
            dst = _index(device_ids, self.device)
            for (dk, dv), (hk, hv) in zip(self.device_layers, host_layers, strict=True):
                for pool, host in ((dk, hk), (dv, hv)):
                    staged = torch.empty(
                        (len(device_ids), *pool.shape[1:]), dtype=pool.dtype, device=self.device
                    )
                    for i, a, b in _runs(host_ids):
                        staged[i : i + b - a].copy_(host[a:b], non_blocking=True)
                    pool.index_copy_(0, dst, staged)

    def tensor_to_device(self, data: torch.Tensor, device_ids: Sequence[int]) -> None:
        """Copy a gathered CPU tensor ``[layers, 2, n, ...]`` into device blocks ``device_ids``."""
        if not device_ids:
            return
        if self.stream is None:
            dst = _index(device_ids, self.device)
            for layer, (dk, dv) in enumerate(self.device_layers):
                dk[dst] = data[layer, 0]
                dv[dst] = data[layer, 1]
            return
        with self._side_stream():
            dst = _index(device_ids, self.device)
            # Pageable memory: the copy is staged before it returns, so ``data`` may go.
            moved = data.to(self.device, non_blocking=True)
            for layer, (dk, dv) in enumerate(self.device_layers):
                dk.index_copy_(0, dst, moved[layer, 0])
                dv.index_copy_(0, dst, moved[layer, 1])

    def gather(self, layers: KVLayers, block_ids: Sequence[int]) -> torch.Tensor:
        """A CPU copy ``[layers, 2, n, block_size, kv_heads, head_dim]`` of ``block_ids`` of
        ``layers`` (the device pools or a host pool); waits for pending copies first."""
        self.synchronize()
        device = layers[0][0].device
        index = _index(block_ids, device)
        parts = [torch.stack((k[index], v[index])) for k, v in layers]
        return torch.stack(parts).cpu()

    def synchronize(self) -> None:
        """Block the CPU until every copy issued so far is done (before reading host memory)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).synchronize()
            self.stream.synchronize()

    def _side_stream(self):
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
