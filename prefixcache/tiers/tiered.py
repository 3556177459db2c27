"""The tiers behind the device prefix cache, in order, and the moves between them.

Data moves down on eviction and back up on a match, whatever the tiers are:

- device -> first tier: ``offload`` runs as the radix cache's ``on_evict``, before the
  evicted device blocks are freed. Each chunk the evicted run touches is stored whole
  from its start: its blocks that stay on the device are read too, so a chunk trimmed
  block by block arrives complete at once, and later trims of it are already covered;
- tier -> next tier: a chunk a tier drops to make room is handed to the tier below;
- device -> persistent tiers: ``on_computed`` writes each chunk through as soon as it is
  computed, and a sequence's partial last chunk when it ends, so a restarted engine
  finds every prefix an earlier one computed, not only the evicted ones;
- tiers -> device: ``extend`` asks the tiers in order for the chunks that continue a
  device match, down to a block, and copies them into fresh device blocks.

Cache events (``prefixcache.cache.events``): a full chunk evicted from the device that
no local tier takes, and one the last local tier drops, is recorded as evicted. Shared
tiers (``shared = True``, e.g. Redis) hold chunks for every engine, not for this one.

Every chunk served is checked against the asker's prefix digest, position and tokens,
whichever tier it comes from; one that fails is a miss and is discarded. A tier that
raises is logged and counted, and its answer taken as a miss or a skipped store.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from prefixcache.cache.events import CacheEvents
from prefixcache.cache.radix_node import EvictedRun
from prefixcache.tiers.base import ChunkQuery, KVChunk, KVTier
from prefixcache.tiers.chunk_chains import ChunkChains
from prefixcache.tiers.registry import TierContext, make_kv_tier, tier_names
from prefixcache.tiers.stats import TierStats
from prefixcache.tiers.transfer import KVTransfer

if TYPE_CHECKING:
    from prefixcache.cache.kv_cache import KVCache
    from prefixcache.config import EngineConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TierCounters:
    """Bytes moved between the device and the tiers since construction."""

    offloaded_bytes: int = 0  # device -> tiers (evicted or written through)
    onloaded_bytes: int = 0  # tiers -> device


class _Piece(NamedTuple):
    """Blocks ``lo .. hi-1`` of ``chunk``, found in tier ``tier`` for ``query``."""

    tier: int
    query: ChunkQuery
    chunk: KVChunk
    lo: int
    hi: int


class TieredCache:
    """An ordered list of ``KVTier``s behind one engine's device KV pools."""

    def __init__(
        self,
        transfer: KVTransfer,
        block_size: int,
        chunk_size: int,
        tiers: Sequence[KVTier],
        events: CacheEvents | None = None,
    ) -> None:
        self.transfer, self.tiers = transfer, list(tiers)
        self.events = events
        self.block_size, self.chunk_size = block_size, chunk_size
        self.blocks_per_chunk = chunk_size // block_size
        self.counters = TierCounters()
        self._hit_tokens = [0] * len(self.tiers)
        self._failures = [0] * len(self.tiers)
        self._deferred: list[tuple[int, KVChunk]] | None = None  # stores held back
        local = [i for i, tier in enumerate(self.tiers) if not is_shared(tier)]
        self._last_local = local[-1] if local else -1
        for i, tier in enumerate(self.tiers):
            below = i + 1 < len(self.tiers)
            spill = functools.partial(self._spill, i + 1) if below else None
            tier.on_evict = _Dropped(self, below) if i == self._last_local else spill

    def tier(self, name: str) -> KVTier:
        """The tier named ``name``; ``KeyError`` if there is none."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    # -- down: device -> tiers --------------------------------------------------------

    def offload(self, run: EvictedRun, parents: list[bytes | None]) -> None:
        """Store the chunks of an evicted device run in the first tier (``on_evict``).

        ``parents[k]`` is the digest of the prefix before chunk ``k`` of the run (None:
        unknown, the chunk is not stored).
        """
        pieces = self._run_pieces(run, parents)
        first = self.tiers[0]
        with self.transfer.copying():
            # Suffix first, so the prefix ends up most recent and leaves the tier last.
            for query, block_ids in reversed(pieces):
                if self._guard(0, first.contains, query, default=False):
                    continue  # a trim of a chunk stored whole already
                self._store(0, self._read(query, block_ids), owned=True)
        if self.events is not None and self.events.enabled:
            self._record_offloaded(run, pieces)

    def _record_offloaded(self, run: EvictedRun, pieces: list[tuple[ChunkQuery, list[int]]]):
        """Record as evicted the full chunks of ``run`` that no local tier took."""
        kept = set()
        # Every local tier is asked: a chunk the first one dropped while taking this run
        # went on to the next one.
        local = [i for i in range(self._last_local + 1) if not is_shared(self.tiers[i])]
        for query, _ in pieces if local else ():
            # While an onload runs, a chunk is held back and stored after it: kept too.
            held = self._deferred is not None or any(
                self._guard(i, self.tiers[i].contains, query, default=False) for i in local
            )
            if held:
                kept.add(query.key)
        gone = [h for h in reversed(run.chunk_hashes) if h not in kept]  # suffix first
        self.events.record("evicted", run.salt, gone)

    def on_computed(
        self,
        chains: ChunkChains,
        tokens: np.ndarray,
        block_ids: list[int],
        first_chunk: int,
        finished: bool,
    ) -> None:
        """Write computed chunks through to the persistent tiers: whole chunks
        ``first_chunk ..`` of ``tokens`` (whole blocks, in device blocks ``block_ids``;
        ``chains`` fed that far), and the partial last chunk too when ``finished``."""
        targets = [i for i, tier in enumerate(self.tiers) if tier.persistent]
        cs, nb = self.chunk_size, self.blocks_per_chunk
        end = len(tokens) if finished else len(tokens) // cs * cs
        if not targets or end <= first_chunk * cs:
            return
        queries = [
            (ChunkQuery(chains.seed(c), chains.parent(c), c * cs, tokens[c * cs : end][:cs]), c)
            for c in range(first_chunk, -(-end // cs))
        ]
        with self.transfer.copying():
            for i in targets:
                for query, c in reversed(queries):
                    # Chunks stored already are only touched, so a hot prefix stays.
                    if not self._guard(i, self.tiers[i].touch, query, default=False):
                        ids = block_ids[c * nb : c * nb + len(query.tokens) // self.block_size]
                        self._store(i, self._read(query, ids), owned=True)

    def _run_pieces(
        self, run: EvictedRun, parents: list[bytes | None]
    ) -> list[tuple[ChunkQuery, list[int]]]:
        """Each chunk of ``run`` from its start, with the device blocks that hold it."""
        cs, nb = self.chunk_size, self.blocks_per_chunk
        block_ids = run.head_block_ids + run.block_ids
        pieces = []
        for k, parent in enumerate(parents):
            if parent is not None:
                seed = run.chunk_hashes[k - 1] if k else run.seed
                tokens = run.token_ids[k * cs : (k + 1) * cs]
                query = ChunkQuery(seed, parent, run.start + k * cs, tokens)
                pieces.append((query, block_ids[k * nb : (k + 1) * nb]))
        return pieces

    def _read(self, query: ChunkQuery, block_ids: list[int]) -> KVChunk:
        data = self.transfer.read(block_ids)
        self.counters.offloaded_bytes += len(block_ids) * self.transfer.block_bytes
        return KVChunk(query.key, query.parent, query.start, query.tokens, data)

    def _store(self, index: int, chunk: KVChunk, owned: bool = False) -> None:
        """Put ``chunk`` into tier ``index``, or hold it back while onloading: in CPU
        memory, so device memory stays free for the onload, and copied unless ``owned``,
        since a tier may reuse its own memory meanwhile."""
        if self._deferred is None:
            self._guard(index, self.tiers[index].put, chunk, default=False)
            return
        chunk = chunk._replace(data=chunk.data.to("cpu", copy=not owned))
        self._deferred.append((index, chunk))

    def _spill(self, index: int, chunk: KVChunk) -> None:
        """``on_evict`` of tier ``index - 1``: hand the chunk to tier ``index``."""
        self._store(index, chunk)

    def _dropped_by_last_local(self, chunk: KVChunk) -> None:
        """``on_evict`` of the last local tier: unless the device cache still holds
        ``chunk``, the engine no longer does (a shared tier below may still take it)."""
        events = self.events
        whole = len(chunk.tokens) == self.chunk_size
        if whole and events is not None and chunk.key not in events.on_device:
            events.record("evicted", None, (chunk.key,))
        if self._last_local + 1 < len(self.tiers):
            self._spill(self._last_local + 1, chunk)

    # -- up: tiers -> device ----------------------------------------------------------

    def extend(
        self,
        tokens: np.ndarray,
        chains: ChunkChains,
        start: int,
        max_blocks: int,
        take_blocks: Callable[[int], list[int] | None],
        count_hits: bool = True,
    ) -> list[int]:
        """Continue a device match of ``start`` tokens (block aligned) of ``tokens`` from
        the tiers, by at most ``max_blocks`` blocks; ``chains`` is fed all of ``tokens``.

        ``take_blocks(n)`` gives ``n`` free device blocks (evicting, so offloading, if it
        must) or None. Returns the device blocks filled, in order: they hold KV for
        ``tokens[start : start + len(result) * block_size]``. ``count_hits``: add the blocks
        served to the tiers' hit counters (False for a request's repeated lookups).
        """
        # Until the copies below are done, every store is held back: a store could make
        # a tier evict what the pieces found point into. Chunks ``take_blocks`` evicts
        # from the device are read at once, and stored after.
        self._deferred, block_ids = [], []
        try:
            pieces = self._find(tokens, chains, start, max_blocks)
            if pieces:
                block_ids = take_blocks(sum(p.hi - p.lo for p in pieces)) or []
            if block_ids:
                self._load(pieces, block_ids, count_hits)
        finally:
            deferred, self._deferred = self._deferred, None
            with self.transfer.copying():
                for index, chunk in deferred:
                    self._store(index, chunk)
        return block_ids

    def _find(
        self, tokens: np.ndarray, chains: ChunkChains, start: int, max_blocks: int
    ) -> list[_Piece]:
        """The longest run of stored blocks that continues ``tokens`` from ``start``."""
        cs, bs, nb = self.chunk_size, self.block_size, self.blocks_per_chunk
        pieces: list[_Piece] = []
        pos, limit, budget = start, len(tokens) // bs * bs, max_blocks
        while pos < limit and budget > 0:
            c = pos // cs
            query = ChunkQuery(
                chains.seed(c), chains.parent(c), c * cs, tokens[c * cs : limit][:cs]
            )
            lo = (pos - c * cs) // bs
            found = self._lookup(query, lo)
            if found is None:
                break
            piece = found._replace(hi=min(found.hi, lo + budget))
            pieces.append(piece)
            budget -= piece.hi - lo
            pos = c * cs + piece.hi * bs
            if piece.hi < nb:
                break
        return pieces

    def _lookup(self, query: ChunkQuery, lo: int) -> _Piece | None:
        """The tier chunk holding the most blocks of ``query`` past block ``lo``: the
        first tier that holds all of them wins, lower tiers are asked only for more."""
        best = None
        wanted = len(query.tokens) // self.block_size
        for i, tier in enumerate(self.tiers):
            chunk = self._guard(i, tier.get, query)
            hi = self._guard(i, self._verified, i, chunk, query, default=0)
            if hi > lo and (best is None or hi > best.hi):
                best = _Piece(i, query, chunk, lo, hi)
            if best is not None and best.hi == wanted:
                break
        return best

    def _verified(self, index: int, chunk: KVChunk | None, query: ChunkQuery) -> int:
        """Whole blocks of ``query`` that ``chunk`` (from tier ``index``) holds; a chunk
        that holds none, or whose data does not fit its tokens, is discarded."""
        if chunk is None:
            return 0
        bs = self.block_size
        shape = self.transfer.copy_shape(len(chunk.tokens) // bs)
        fits = tuple(chunk.data.shape) == shape and chunk.data.dtype == self.transfer.dtype
        blocks = chunk.matched_tokens(query) // bs if fits else 0
        if not blocks:
            logger.warning("tier %r returned a chunk that does not match", self.tiers[index].name)
            self._guard(index, self.tiers[index].discard, chunk)
        return blocks

    def _load(self, pieces: list[_Piece], block_ids: list[int], count_hits: bool = True) -> None:
        """Copy ``pieces`` into ``block_ids`` in order; count the hits, touch the chunks."""
        offset = 0
        with self.transfer.copying():
            for p in pieces:
                count = p.hi - p.lo
                self.transfer.write(
                    p.chunk.data[:, :, p.lo : p.hi], block_ids[offset : offset + count]
                )
                offset += count
                if count_hits:
                    self._hit_tokens[p.tier] += count * self.block_size
        self.counters.onloaded_bytes += len(block_ids) * self.transfer.block_bytes
        for p in reversed(pieces):  # suffix first: the prefix ends up most recent
            served = p.query.shorter(p.hi * self.block_size)
            self._guard(p.tier, self.tiers[p.tier].touch, served, default=False)

    # -- state ------------------------------------------------------------------------

    def tier_stats(self) -> list[TierStats]:
        """Each tier's stats, in order, with the tokens served and failures seen here."""
        result = []
        for i, tier in enumerate(self.tiers):
            own = tier.stats()
            result.append(
                replace(
                    own,
                    hit_tokens=own.hit_tokens + self._hit_tokens[i],
                    failures=own.failures + self._failures[i],
                )
            )
        return result

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless every tier's bookkeeping adds up."""
        assert self._deferred is None, "stores still held back"
        for tier in self.tiers:
            tier.check_integrity()

    def _guard(self, index: int, method: Callable, *args, default=None):
        """``method(*args)`` of tier ``index``; on an error, log it and return ``default``."""
        try:
            return method(*args)
        except Exception:
            self._failures[index] += 1
            # A server that is gone fails every call: the first is worth a traceback, the
            # rest show in the tier's failure count.
            level = logging.WARNING if self._failures[index] == 1 else logging.DEBUG
            name, call = self.tiers[index].name, method.__name__
            logger.log(level, "KV tier %r failed in %s; taken as a miss", name, call, exc_info=True)
            return default


class _Dropped:
    """``on_evict`` of the last local tier. With no tier below, only the chunk's names
    are needed (``needs_data`` False: a disk tier then does not read the file)."""

    def __init__(self, cache: TieredCache, needs_data: bool) -> None:
        self.cache, self.needs_data = cache, needs_data

    def __call__(self, chunk: KVChunk) -> None:
        self.cache._dropped_by_last_local(chunk)


def is_shared(tier: KVTier) -> bool:
    """True for a tier every engine reads and writes (a server), not this engine's own."""
    return bool(getattr(tier, "shared", False))


def build_tiers(
    config: EngineConfig,
    kv_cache: KVCache,
    fingerprint: str,
    events: CacheEvents | None = None,
    transfer: KVTransfer | None = None,
) -> TieredCache | None:
    """The tiers ``config`` asks for over ``kv_cache``'s pools, or None if it asks for none.

    ``transfer``: how blocks are copied out of and into the pools (default: this
    process's pools alone; a tensor-parallel engine passes one that moves every
    rank's shard). ``ValueError`` if ``config.kv_tiers`` names a tier nobody registered.
    """
    names = tier_names(config)
    if not config.enable_prefix_caching or not names:
        return None
    transfer = transfer or KVTransfer(kv_cache.layers)
    context = TierContext(
        config=config,
        fingerprint=fingerprint,
        block_size=config.block_size,
        chunk_size=config.chunk_size,
        block_shape=transfer.block_shape,
        dtype=transfer.dtype,
        num_layers=len(kv_cache.layers),
        device=transfer.device,
    )
    tiers = [make_kv_tier(name, context) for name in names]
    return TieredCache(transfer, config.block_size, config.chunk_size, tiers, events)
