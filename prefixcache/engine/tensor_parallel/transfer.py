"""Block copies between the tiers and every rank's shard of the device pools.

Rank 0 owns the tiers. A copy out of the device gathers each rank's shard of the
blocks to rank 0 and joins them along the KV-head axis (rank order), so a tier stores
one chunk holding every rank's heads under one key: a chunk is a hit only with every
shard in it. A copy into the device splits the chunk the same way and scatters the
shards back. Both are collectives, announced to the workers by one message each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefixcache.engine.tensor_parallel.group import WorkerGroup
from prefixcache.engine.tensor_parallel.messages import ReadBlocks, WriteBlocks
from prefixcache.tiers.transfer import KVLayers, KVTransfer

_HEADS = 4  # the KV-head axis of a copy [layers, 2, blocks, block_size, heads, row]


class ShardedKVTransfer(KVTransfer):
    """``KVTransfer`` over rank 0's pools whose copies hold every rank's shard."""

    def __init__(self, device_layers: KVLayers, group: WorkerGroup) -> None:
        super().__init__(device_layers)
        self.group = group

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One K or V block with every rank's heads: ``(block_size, heads * ranks, row)``."""
        block_size, heads, row = super().block_shape
        return (block_size, heads * self.group.size, row)

    def read(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Every rank's shard of ``block_ids``, joined, on rank 0's device."""
        if not block_ids:
            return torch.empty(self.copy_shape(0), dtype=self.dtype, device=self.device)
        local = super().read(block_ids)
        self.group.send(ReadBlocks(list(block_ids)))
        return torch.cat(self.group.gather(local), dim=_HEADS)

    def write(self, data: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Split ``data`` (every rank's heads) by rank and write each rank's shard into
        its blocks ``block_ids``."""
        if not block_ids:
            return
        moved = data.to(self.device)
        shards = [s.contiguous() for s in moved.chunk(self.group.size, dim=_HEADS)]
        self.group.send(WriteBlocks(list(block_ids)))
        super().write(self.group.scatter(shards), block_ids)
