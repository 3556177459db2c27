"""The Redis tier: KV chunks in a Redis server that every engine of a model shares.

Engines on any machine that point ``kv_store`` at the same Redis reuse each other's
prefixes: every chunk an engine computes is written through (it is ``persistent``), and
a lookup that the device, host and disk tiers miss asks Redis last.

- Key: ``prefixcache:kv:<model fingerprint>:<parent digest>-<chunk key>``, the disk
  tier's file name under its fingerprint folder. The key is chained from the tenant
  salt, so a tenant only ever asks for its own chunks; another model's are other keys.
- Value: one chunk in the disk tier's file format (``kv_file``): a header naming the
  fingerprint, key, parent digest, start, dtype and shape, an xxh3 checksum, the
  chunk's token ids and its KV bytes. Every value read is verified: a corrupt,
  truncated or mismatched one is a miss and is deleted.
- Writes are one ``SET ... NX`` of one whole value (atomic per chunk), made behind the
  request by a background thread from a bounded queue: a step never waits for Redis;
  a full queue drops the write and counts it (``dropped_writes``).
- Beside each value, small index keys name it for every leading part of it: for each
  ``n`` of its ``m`` blocks, ``prefixcache:kvidx:<fingerprint>:<digest>`` holds the
  value's key, where the digest names the whole prefix through its first ``n`` blocks.
  A lookup reads the index keys of the asker's first ``n`` blocks for every ``n`` in one
  ``MGET``, then the value the longest one names, so an asker whose prompt ends inside
  a chunk finds a chunk another engine stored whole. An index key whose value is gone
  (evicted, deleted) is a miss and is dropped.
- Redis down or slow: see ``redis_link`` (short timeouts, off for a back-off, counted
  in ``failures``). Size: bounded by Redis itself (``maxmemory`` with
  ``allkeys-lru``); this tier never evicts and never calls ``on_evict``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from chunking.hashing import TOKEN_DTYPE
from prefixcache.tiers.base import ChunkQuery, KVChunk
from prefixcache.tiers.chunk_chains import chunk_digest
from prefixcache.tiers.kv_file import ChunkFileError, ChunkLayout, decode, encode
from prefixcache.tiers.redis_link import RedisLink, WriteBehind, connect
from prefixcache.tiers.registry import TierContext, register_kv_tier
from prefixcache.tiers.stats import TierStats

logger = logging.getLogger(__name__)

KEY_PREFIX = "prefixcache:kv"
INDEX_PREFIX = "prefixcache:kvidx"
MAX_PENDING_WRITES = 64
KNOWN_KEYS = 1 << 16  # names this engine wrote or read lately, to skip rewriting them


def chunk_name(fingerprint: str, parent: bytes, key: int) -> str:
    """The Redis key of the chunk ``key`` after the prefix digest ``parent``."""
    return f"{KEY_PREFIX}:{fingerprint}:{parent.hex()}-{key:016x}"


def index_name(fingerprint: str, parent: bytes, tokens: np.ndarray) -> str:
    """The Redis key naming a stored chunk that begins with ``tokens`` after the prefix
    digest ``parent``: the digest of the whole prefix through ``tokens``."""
    digest = chunk_digest(parent, np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE))
    return f"{INDEX_PREFIX}:{fingerprint}:{digest.hex()}"


class RedisTier:
    """KV chunks in a shared Redis; lookups block the asker briefly, writes never do."""

    name = "redis"
    persistent = True  # every computed chunk is written through, for the other engines
    shared = True  # holds chunks for every engine: none of them can count on it

    def __init__(
        self,
        link: RedisLink,
        layout: ChunkLayout,
        max_pending_writes: int = MAX_PENDING_WRITES,
    ) -> None:
        self.link, self.layout = link, layout
        self.writer = WriteBehind(link, max_pending_writes)
        self.on_evict: Callable[[KVChunk], None] | None = None  # Redis evicts on its own
        self.read_bytes = self.written_bytes = self.stored_blocks = 0
        self.corrupt = 0  # values found bad and deleted
        self._known: OrderedDict[str, None] = OrderedDict()  # names stored lately, LRU
        self._outages = 0  # the link's outages when ``_known`` was last trusted

    @classmethod
    def from_context(cls, context: TierContext) -> RedisTier:
        """The Redis tier at ``context.config.kv_store``."""
        url = context.config.kv_store
        if not url:
            raise ValueError("the redis tier needs kv_store, e.g. 'redis://127.0.0.1:6379/0'")
        layout = ChunkLayout(context.fingerprint, context.dtype, context.chunk_shape)
        return cls(RedisLink(connect(url), url), layout)

    def name_of(self, parent: bytes, key: int) -> str:
        """The Redis key of a chunk of this engine's model."""
        return chunk_name(self.layout.fingerprint, parent, key)

    # -- the KVTier protocol ----------------------------------------------------------

    def contains(self, query: ChunkQuery) -> bool:
        """True if this engine stored (or read) the chunk of exactly ``query`` lately;
        the network is not asked, so offloading never waits for Redis."""
        return self._is_known(self.name_of(query.parent, query.key))

    def touch(self, query: ChunkQuery) -> bool:
        """Refresh the chunk of ``query`` in Redis's LRU, behind the request; False if
        this engine does not know it to be stored (the caller then writes it)."""
        name = self.name_of(query.parent, query.key)
        if not self._is_known(name):
            return False
        self.writer.submit_spare(lambda client: client.touch(name))
        return True

    def get(self, query: ChunkQuery) -> KVChunk | None:
        """The verified chunk holding the most leading blocks of ``query``, or None."""
        bs, fp = self.layout.block_size, self.layout.fingerprint
        indexes = [
            index_name(fp, query.parent, query.tokens[: n * bs])
            for n in range(len(query.tokens) // bs, 0, -1)
        ]
        if not indexes:
            return None
        targets = self.link.call(lambda client: client.mget(indexes), default=())
        tried = set()
        for index, target in zip(indexes, targets, strict=False):
            if target is None or target in tried:
                continue
            tried.add(target)
            chunk = self._read(target.decode(errors="replace"), query)
            if chunk is not None:
                return chunk
            self.writer.submit(lambda client, index=index: client.delete(index))
        return None

    def put(self, chunk: KVChunk) -> bool:
        """Queue ``chunk`` to be written; False if it is known stored, the link is off,
        or the write queue is full (then counted in ``dropped_writes``)."""
        name = self.name_of(chunk.parent, chunk.key)
        if self._is_known(name):
            return False
        if not self.link.usable():
            return False
        # ``chunk.data`` may be device memory or a view another tier reuses: copy it now.
        owned = chunk._replace(data=chunk.data.to("cpu", copy=True), tokens=chunk.tokens.copy())
        if not self.writer.submit(lambda client: self._write(client, name, owned)):
            return False
        self._remember(name)
        return True

    def discard(self, chunk: KVChunk) -> None:
        """Delete the value of ``chunk`` (one a caller found not to match), behind the request."""
        self._forget(self.name_of(chunk.parent, chunk.key))

    def stats(self) -> TierStats:
        """Blocks and bytes written and read, failures, and writes dropped. Sizes are
        Redis's own (``INFO memory``): the tier does not ask, to keep stats local."""
        return TierStats(
            name=self.name,
            stored_blocks=self.stored_blocks,
            read_bytes=self.read_bytes,
            written_bytes=self.written_bytes,
            failures=self.link.failures + self.corrupt,
            dropped_writes=self.writer.dropped,
        )

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless the queue and the name cache keep their bounds."""
        assert self.writer.pending <= self.writer.max_pending, "redis write queue over its bound"
        assert len(self._known) <= KNOWN_KEYS, "redis name cache over its bound"

    # -- helpers ----------------------------------------------------------------------

    def drain(self) -> None:
        """Block until every write queued so far has been made (tests, shutdown)."""
        self.writer.drain()

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread."""
        self.writer.close()

    def _read(self, name: str, query: ChunkQuery) -> KVChunk | None:
        raw = self.link.call(lambda client: client.get(name))
        if raw is None:  # evicted meanwhile, or the link went down
            self._known.pop(name, None)
            return None
        self.read_bytes += len(raw)
        try:
            chunk = decode(self.layout, bytearray(raw))
            if self.name_of(chunk.parent, chunk.key) != name or chunk.start != query.start:
                raise ChunkFileError("holds another chunk than its key names")
        except ChunkFileError as exc:
            logger.warning("deleting Redis KV value %s: %s", name, exc)
            self.corrupt += 1
            self._forget(name)
            return None
        self._remember(name)
        return chunk

    def _write(self, client, name: str, chunk: KVChunk) -> None:
        """On the writer thread: store ``chunk`` unless its key exists (one SET of the
        whole value), then its index keys."""
        value = b"".join(encode(self.layout, chunk))
        bs, fp = self.layout.block_size, self.layout.fingerprint
        pipe = client.pipeline(transaction=False)
        pipe.set(name, value, nx=True)
        for n in range(1, len(chunk.tokens) // bs + 1):
            pipe.set(index_name(fp, chunk.parent, chunk.tokens[: n * bs]), name)
        stored = pipe.execute()[0]
        if stored:
            self.written_bytes += len(value)
            self.stored_blocks += len(chunk.tokens) // bs

    def _is_known(self, name: str) -> bool:
        """True if ``name`` was stored or read lately (marking it so again), and Redis
        has not been away since: a restarted server may have lost it."""
        if self.link.outages != self._outages:
            self._known.clear()
            self._outages = self.link.outages
        if name not in self._known:
            return False
        self._known.move_to_end(name)
        return True

    def _remember(self, name: str) -> None:
        self._known[name] = None
        self._known.move_to_end(name)
        if len(self._known) > KNOWN_KEYS:
            self._known.popitem(last=False)

    def _forget(self, name: str) -> None:
        self._known.pop(name, None)
        self.writer.submit(lambda client: client.delete(name))


register_kv_tier("redis", RedisTier.from_context)
