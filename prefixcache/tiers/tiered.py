"""Host and disk tiers behind the device prefix cache.

Data moves down on eviction and back up on a match:

- device -> host: ``offload`` runs as the radix cache's ``on_evict``, before the
  evicted device blocks are freed, and copies whole hash chunks (verified pieces of a
  chunk are assembled as eviction trims it block by block);
- host -> disk: a complete chunk the host tier evicts is written unless it is there;
- device -> disk: ``persist`` writes each chunk through as soon as it is computed, so
  a restarted engine finds every prefix an earlier one computed, not only the ones
  that happened to be evicted before it stopped;
- host or disk -> device: ``find`` plans the chunks that continue a device match,
  ``load`` copies them into freshly allocated device blocks.

Chunks are found by their 64-bit chained hash (or, for a chunk a sequence has only
part of, by the digest of the prefix before it) and verified by that digest, their
position and their token ids (see ``chunk_chains``), so a colliding hash never serves
KV of other tokens, nor of the same tokens after another prefix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from chunking.hashing import common_prefix_length
from prefixcache.cache.radix_node import EvictedRun
from prefixcache.tiers.chunk_chains import ChunkChains
from prefixcache.tiers.disk import DiskTier
from prefixcache.tiers.host import HostChunk, HostTier
from prefixcache.tiers.kv_file import ChunkLayout, ChunkRecord
from prefixcache.tiers.transfer import KVTransfer

if TYPE_CHECKING:
    from prefixcache.cache.kv_cache import KVCache
    from prefixcache.config import EngineConfig


@dataclass(slots=True)
class TierCounters:
    """Tokens served and bytes moved by the tiers since construction."""

    host_hit_tokens: int = 0
    disk_hit_tokens: int = 0
    offloaded_bytes: int = 0  # device -> host
    onloaded_bytes: int = 0  # host or disk -> device


class OnloadPiece(NamedTuple):
    """Blocks ``lo .. hi-1`` of one chunk, from a host chunk or a disk record."""

    chunk: HostChunk | None
    record: ChunkRecord | None
    lo: int
    hi: int

    @property
    def num_blocks(self) -> int:
        """Blocks this piece fills."""
        return self.hi - self.lo


class OnloadPlan(NamedTuple):
    """Consecutive pieces that extend a device match of ``start`` tokens."""

    start: int
    pieces: list[OnloadPiece]
    block_size: int

    @property
    def num_blocks(self) -> int:
        """Device blocks the plan needs."""
        return sum(p.num_blocks for p in self.pieces)

    @property
    def end(self) -> int:
        """Tokens cached once the plan is loaded."""
        return self.start + self.num_blocks * self.block_size


class TieredCache:
    """The host tier (optional) and the disk tier (optional) of one engine's KV cache."""

    def __init__(
        self,
        transfer: KVTransfer,
        block_size: int,
        chunk_size: int,
        host: HostTier | None = None,
        disk: DiskTier | None = None,
    ) -> None:
        self.transfer, self.host, self.disk = transfer, host, disk
        self.block_size, self.chunk_size = block_size, chunk_size
        self.blocks_per_chunk = chunk_size // block_size
        k = transfer.device_layers[0][0]
        self.block_bytes = k[0].numel() * k.element_size() * 2 * len(transfer.device_layers)
        self.counters = TierCounters()
        if host is not None:
            host.on_evict = self._spill

    # -- down: device -> host -> disk -------------------------------------------------

    def offload(self, run: EvictedRun, parents: list[bytes | None]) -> None:
        """Copy the chunks of an evicted device run into the host tier (``on_evict``).

        ``parents[k]`` is the digest of the prefix before chunk ``k`` of the run (None:
        unknown, the chunk is dropped).
        """
        if self.host is None:
            return
        cs, bs = self.chunk_size, self.block_size
        cut = len(run.token_ids) - len(run.block_ids) * bs  # first evicted token, relative
        copies: list[tuple[HostChunk, int, int, int]] = []  # chunk, lo, hi, chunk index
        for k, parent in enumerate(parents):
            if parent is None:
                continue
            chunk_hash = run.chunk_hashes[k] if k < len(run.chunk_hashes) else None
            tokens = run.token_ids[k * cs : (k + 1) * cs]
            lo = max(cut - k * cs, 0) // bs
            targets = self._offload_targets(chunk_hash, parent, run.start + k * cs, tokens, lo)
            for chunk, hi in targets:
                chunk.pins += 1  # a later add in this run must not evict it
                copies.append((chunk, lo, hi, k))
        device_ids, host_ids = [], []
        for chunk, lo, hi, k in copies:
            first = (k * cs + lo * bs - cut) // bs
            device_ids += run.block_ids[first : first + hi - lo]
            host_ids += self.host.block_ids(chunk, lo, hi)
            chunk.first_block = lo
            chunk.pins -= 1
        self.transfer.device_to_host(device_ids, self.host.layers, host_ids)
        self.counters.offloaded_bytes += len(device_ids) * self.block_bytes
        # Touch suffix first, so prefixes are more recent and leave the host last.
        self.host.touch(reversed([chunk for chunk, *_ in copies]))

    def _offload_targets(
        self, chunk_hash: int | None, parent: bytes, start: int, tokens: np.ndarray, lo: int
    ) -> list[tuple[HostChunk, int]]:
        """Host chunks that need blocks ``lo ..`` of this run's chunk, with where to stop."""
        host = self.host
        if chunk_hash is None:  # the run ends inside this chunk: complete earlier pieces
            end = len(tokens) // self.block_size
            return [
                (c, c.first_block)
                for c in host.with_parent(parent)
                if c.start == start
                and lo < c.first_block <= end
                and np.array_equal(c.tokens[: len(tokens)], tokens)
            ]
        chunk = host.get(chunk_hash)
        if chunk is None:
            chunk = host.add(chunk_hash, parent, start, tokens, self.blocks_per_chunk)
            return [] if chunk is None else [(chunk, self.blocks_per_chunk)]
        if chunk.first_block <= lo or not chunk.matches(parent, start, tokens):
            return []  # already held, or a colliding hash: keep what is there
        return [(chunk, chunk.first_block)]

    def _spill(self, chunk: HostChunk) -> None:
        """Host eviction: write a complete chunk to disk unless it is there already."""
        if self.disk is None or not chunk.complete or self.disk.contains(chunk.chunk_hash):
            return
        ids = self.host.block_ids(chunk, 0, self.blocks_per_chunk)
        data = self.transfer.gather(self.host.layers, ids)
        self.disk.put(ChunkRecord(chunk.chunk_hash, chunk.parent, chunk.start, chunk.tokens, data))

    def persist(
        self, chains: ChunkChains, tokens: np.ndarray, first: int, device_ids: list[int]
    ) -> None:
        """Write computed chunks through to disk: chunks ``first ..`` of ``tokens`` (whole
        chunks; ``chains`` fed that far), whose blocks are ``device_ids`` (from chunk 0)."""
        if self.disk is None:
            return
        cs, nb = self.chunk_size, self.blocks_per_chunk
        num_chunks = len(tokens) // cs
        # Chunks already on disk are only touched, so a hot prefix stays there.
        todo = [c for c in range(first, num_chunks) if not self.disk.touch(chains.chunk_hash(c))]
        if not todo:
            return
        ids = [i for c in todo for i in device_ids[c * nb : (c + 1) * nb]]
        data = self.transfer.gather(self.transfer.device_layers, ids)
        for j, c in enumerate(todo):
            record = ChunkRecord(
                chains.chunk_hash(c),
                chains.parent(c),
                c * cs,
                tokens[c * cs : (c + 1) * cs],
                data[:, :, j * nb : (j + 1) * nb],
            )
            self.disk.put(record)

    # -- up: host or disk -> device ---------------------------------------------------

    def find(
        self, tokens: np.ndarray, chains: ChunkChains, start: int, max_blocks: int
    ) -> OnloadPlan:
        """Plan the longest run of stored blocks that continues ``tokens`` from ``start``
        (block aligned; ``chains`` fed all of ``tokens``), at most ``max_blocks``. Host
        chunks in the plan stay pinned until ``release``; disk chunks are read here."""
        cs, bs, nb = self.chunk_size, self.block_size, self.blocks_per_chunk
        pieces: list[OnloadPiece] = []
        pos, limit, budget = start, len(tokens) // bs * bs, max_blocks
        while pos < limit and budget > 0:
            c = pos // cs
            chunk_tokens = tokens[c * cs : min((c + 1) * cs, limit)]
            lo = (pos - c * cs) // bs
            chunk_hash, parent = chains.chunk_hash(c), chains.parent(c)
            piece = self._find_piece(chunk_hash, parent, c * cs, chunk_tokens, lo)
            if piece is None:
                break
            piece = piece._replace(hi=min(piece.hi, piece.lo + budget))
            if piece.chunk is not None:
                piece.chunk.pins += 1
            pieces.append(piece)
            budget -= piece.num_blocks
            pos = c * cs + piece.hi * bs
            if piece.hi < nb:
                break
        return OnloadPlan(start, pieces, bs)

    def _find_piece(
        self, chunk_hash: int | None, parent: bytes, start: int, tokens: np.ndarray, lo: int
    ) -> OnloadPiece | None:
        """Blocks ``lo ..`` of the chunk at ``start``: from the host if it has them, else
        (whole chunks only) from disk. ``tokens`` are the query's tokens of the chunk."""
        best = None
        if self.host is not None:
            found = self.host.get(chunk_hash) if chunk_hash is not None else None
            candidates = [found] if found is not None else self.host.with_parent(parent)
            for chunk in candidates:
                if chunk.parent != parent or chunk.start != start or chunk.first_block > lo:
                    continue
                hi = common_prefix_length(chunk.tokens, tokens) // self.block_size
                if hi > lo and (best is None or hi > best.hi):
                    best = OnloadPiece(chunk, None, lo, hi)
        if best is None and self.disk is not None and chunk_hash is not None:
            best = self._disk_piece(chunk_hash, parent, start, tokens, lo)
        return best

    def _disk_piece(
        self, chunk_hash: int, parent: bytes, start: int, tokens: np.ndarray, lo: int
    ) -> OnloadPiece | None:
        record = self.disk.read(chunk_hash)
        if record is None:
            return None
        hi = common_prefix_length(record.tokens, tokens) // self.block_size
        if record.parent != parent or record.start != start or hi < len(tokens) // self.block_size:
            self.disk.discard(chunk_hash)  # a mismatched file is a miss, and goes
            return None
        return OnloadPiece(None, record, lo, hi)

    def load(self, plan: OnloadPlan, device_ids: list[int]) -> None:
        """Copy every piece of ``plan`` into ``device_ids`` (in order) and count the hits."""
        host_ids, host_targets, chunks = [], [], []
        offset, counters = 0, self.counters
        for piece in plan.pieces:
            ids = device_ids[offset : offset + piece.num_blocks]
            offset += piece.num_blocks
            tokens = piece.num_blocks * self.block_size
            if piece.chunk is not None:
                host_ids += self.host.block_ids(piece.chunk, piece.lo, piece.hi)
                host_targets += ids
                chunks.append(piece.chunk)
                counters.host_hit_tokens += tokens
            else:
                self.transfer.tensor_to_device(piece.record.data[:, :, piece.lo : piece.hi], ids)
                counters.disk_hit_tokens += tokens
        if host_ids:
            self.transfer.host_to_device(self.host.layers, host_ids, host_targets)
            self.host.touch(reversed(chunks))
        counters.onloaded_bytes += len(device_ids) * self.block_bytes

    def release(self, plan: OnloadPlan) -> None:
        """Unpin the host chunks of ``plan``."""
        for piece in plan.pieces:
            if piece.chunk is not None:
                piece.chunk.pins -= 1

    # -- state ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Per-tier counters: hit tokens, bytes moved, evictions, capacity in use."""
        result = asdict(self.counters)
        if self.host is not None:
            result["host_evicted_blocks"] = self.host.evicted_blocks
            result["host_blocks"] = self.host.num_blocks
            result["host_used_blocks"] = self.host.num_used_blocks
        if self.disk is not None:
            result["disk_written_bytes"] = self.disk.written_bytes
            result["disk_read_bytes"] = self.disk.read_bytes
            result["disk_evicted_blocks"] = self.disk.evicted_blocks
            result["disk_bytes"] = self.disk.used_bytes
            result["disk_files"] = self.disk.num_files
        return result

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless the host pool and the disk index add up."""
        if self.host is not None:
            self.host.check_integrity()
        if self.disk is not None:
            self.disk.check_integrity()


def build_tiers(config: EngineConfig, kv_cache: KVCache, fingerprint: str) -> TieredCache | None:
    """The tiers ``config`` asks for over ``kv_cache``'s pools, or None if it asks for none."""
    if not config.enable_prefix_caching:
        return None
    if not config.host_cache_tokens and not config.disk_cache_dir:
        return None
    layers = kv_cache.layers
    k = layers[0][0]
    nb = config.chunk_size // config.block_size
    host = None
    if config.host_cache_tokens:
        slots = config.host_cache_tokens // config.chunk_size
        pin = k.device.type == "cuda"
        host = HostTier(slots, nb, tuple(k.shape[1:]), len(layers), k.dtype, pin_memory=pin)
    disk = None
    if config.disk_cache_dir:
        layout = ChunkLayout(fingerprint, k.dtype, (len(layers), 2, nb, *k.shape[1:]))
        disk = DiskTier(config.disk_cache_dir, layout, config.disk_cache_bytes)
    return TieredCache(KVTransfer(layers), config.block_size, config.chunk_size, host, disk)
