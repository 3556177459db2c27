"""The disk tier: one file per stored chunk, under a folder named by the model fingerprint.

A file is named by the digest of the prefix before its chunk and the chunk's key
(``{parent}-{key}.kv``), so the files that may continue a prefix are found by name,
after a restart too, and a lookup picks the one sharing the most leading blocks with
the asker's tokens (read from the file's head, then cached). Every file is verified
when read (see ``kv_file``): engines of another model, dtype or layout never share
files, and a corrupt, truncated or mismatched file is a miss: it is deleted and logged.

Writes go to a temporary file renamed into place, so a reader never sees half a file.
The folder is bounded by ``max_bytes``, evicting least recently used files first;
recency lives in memory and in file mtimes, so a restarted engine rebuilds it from the
folder. Several engines may share a folder: a file another engine wrote under the
exact name asked for is found on lookup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chunking.hashing import TOKEN_DTYPE, common_prefix_length
from prefixcache.logs import ThrottledWarning
from prefixcache.tiers.base import ChunkQuery, KVChunk, starts_with
from prefixcache.tiers.kv_file import (
    PREFIX,
    ChunkFileError,
    ChunkHead,
    ChunkLayout,
    decode,
    decode_head,
    encode,
    header_length,
)
from prefixcache.tiers.registry import TierContext, register_kv_tier
from prefixcache.tiers.stats import TierStats

logger = logging.getLogger(__name__)
WRITE_WARNING_INTERVAL_S = 60.0

_NAME = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{16})\.kv$")
_OLD_NAME = re.compile(r"^[0-9a-f]{16}\.kv$")  # an earlier naming, without the parent digest
_STALE_TEMP_SECONDS = 3600.0  # older temp files are left over from a crash
_NONE = torch.empty(0)  # the data of a chunk handed on by name only


@dataclass(slots=True, eq=False)
class _DiskFile:
    """One indexed file; its chunk's ``start`` and ``tokens`` are read when first needed."""

    parent: bytes
    key: int
    size: int
    start: int = -1
    tokens: np.ndarray | None = None


class DiskTier:
    """Chunk files under ``root/<fingerprint>``, at most ``max_bytes`` in all, LRU-evicted."""

    name = "disk"
    persistent = True

    def __init__(self, root: str | os.PathLike[str], layout: ChunkLayout, max_bytes: int) -> None:
        self.layout = layout
        self.max_bytes = max_bytes
        self.folder = Path(root) / layout.fingerprint
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"disk_cache_dir {str(root)!r} is not usable: {exc}") from None
        self.on_evict: Callable[[KVChunk], None] | None = None
        self.used_bytes = 0
        self.written_bytes = self.read_bytes = self.stored_blocks = 0
        self.evicted_blocks = self.failures = 0
        # A full disk fails every write: one warning a minute, with a count, says so.
        self._write_warning = ThrottledWarning(WRITE_WARNING_INTERVAL_S)
        self._lru: OrderedDict[tuple[bytes, int], _DiskFile] = OrderedDict()  # oldest first
        self._by_parent: dict[bytes, dict[int, _DiskFile]] = {}
        self._scan()
        self._make_room(0)

    @classmethod
    def from_context(cls, context: TierContext) -> DiskTier:
        """The disk tier under ``context.config.disk_cache_dir``."""
        config = context.config
        if not config.disk_cache_dir:
            raise ValueError("the disk tier needs disk_cache_dir")
        layout = ChunkLayout(context.fingerprint, context.dtype, context.chunk_shape)
        return cls(config.disk_cache_dir, layout, config.disk_cache_bytes)

    @property
    def num_files(self) -> int:
        """Chunk files in the index."""
        return len(self._lru)

    def path(self, parent: bytes, key: int) -> Path:
        """Where the chunk ``key`` after the prefix digest ``parent`` lives."""
        return self.folder / f"{parent.hex()}-{key:016x}.kv"

    # -- the KVTier protocol ----------------------------------------------------------

    def contains(self, query: ChunkQuery) -> bool:
        """True if a file covers every token of ``query``."""
        return self._covering(query.parent, query.start, query.tokens, query.key) is not None

    def touch(self, query: ChunkQuery) -> bool:
        """Mark the file covering ``query`` most recently used; False if there is none."""
        found = self._covering(query.parent, query.start, query.tokens, query.key)
        if found is not None:
            self._lru.move_to_end((found.parent, found.key))
        return found is not None

    def get(self, query: ChunkQuery) -> KVChunk | None:
        """The verified chunk sharing the most leading blocks with ``query``, or None."""
        bs = self.layout.block_size
        ranked = []
        for found in self._candidates(query.parent, query.start, query.key):
            shared = common_prefix_length(found.tokens, query.tokens) // bs
            if shared:
                ranked.append((shared, found))
        ranked.sort(key=lambda pair: pair[0], reverse=True)
        for _, found in ranked:
            chunk = self._read(found)
            if chunk is not None:
                return chunk
        return None

    def put(self, chunk: KVChunk) -> bool:
        """Write ``chunk`` unless a file covers it already; False if it was not written."""
        covering = self._covering(chunk.parent, chunk.start, chunk.tokens, chunk.key)
        if covering is not None:
            self._lru.move_to_end((covering.parent, covering.key))
            return False
        if (chunk.parent, chunk.key) in self._lru:
            return False  # a colliding key: the file there keeps its name
        for found in self._candidates(chunk.parent, chunk.start, chunk.key):
            if starts_with(chunk.tokens, found.tokens):
                self._delete(found)  # redundant: the new file holds all of it
        pieces = encode(self.layout, chunk)
        size = sum(len(p) for p in pieces)
        if size > self.max_bytes:
            return False
        self._make_room(size)
        if not self._write(self.path(chunk.parent, chunk.key), pieces):
            return False
        tokens = chunk.tokens.copy()
        self._index(_DiskFile(chunk.parent, chunk.key, size, chunk.start, tokens))
        self.written_bytes += size
        self.stored_blocks += len(chunk.tokens) // self.layout.block_size
        return True

    def discard(self, chunk: KVChunk) -> None:
        """Delete the file of ``chunk`` (if any) and forget it."""
        found = self._lru.get((chunk.parent, chunk.key))
        if found is not None:
            self._delete(found)
        else:
            _unlink(self.path(chunk.parent, chunk.key))

    def stats(self) -> TierStats:
        """Bytes bounded and used, files, bytes read and written, evictions, failures."""
        return TierStats(
            name=self.name,
            capacity_bytes=self.max_bytes,
            used_bytes=self.used_bytes,
            entries=len(self._lru),
            stored_blocks=self.stored_blocks,
            evicted_blocks=self.evicted_blocks,
            read_bytes=self.read_bytes,
            written_bytes=self.written_bytes,
            failures=self.failures,
        )

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless the index adds up and respects the bound."""
        assert self.used_bytes == sum(f.size for f in self._lru.values()), "disk bytes out of step"
        assert self.used_bytes <= self.max_bytes, (
            f"disk tier holds {self.used_bytes} bytes, over its bound of {self.max_bytes}"
        )
        by_parent = sum(map(len, self._by_parent.values()))
        assert by_parent == len(self._lru), "disk parent index out of step"

    # -- the index --------------------------------------------------------------------

    def _candidates(self, parent: bytes, start: int, key: int) -> list[_DiskFile]:
        """Files after the prefix ``parent`` at ``start`` (and a file of another engine
        named ``key``), their tokens read."""
        self._adopt(parent, key)
        found = []
        for entry in list(self._by_parent.get(parent, {}).values()):
            if self._read_names(entry) and entry.start == start:
                found.append(entry)
        return found

    def _covering(
        self, parent: bytes, start: int, tokens: np.ndarray, key: int
    ) -> _DiskFile | None:
        found = self._candidates(parent, start, key)
        return next((f for f in found if starts_with(f.tokens, tokens)), None)

    def _adopt(self, parent: bytes, key: int) -> None:
        """Index a file another engine wrote under this exact name, if there is one."""
        if (parent, key) in self._lru:
            return
        try:
            size = self.path(parent, key).stat().st_size
        except OSError:
            return
        self._index(_DiskFile(parent, key, size))
        self._make_room(0)

    def _index(self, entry: _DiskFile) -> None:
        self._lru[(entry.parent, entry.key)] = entry
        self._by_parent.setdefault(entry.parent, {})[entry.key] = entry
        self.used_bytes += entry.size

    def _forget(self, entry: _DiskFile) -> None:
        if self._lru.pop((entry.parent, entry.key), None) is None:
            return
        siblings = self._by_parent[entry.parent]
        del siblings[entry.key]
        if not siblings:
            del self._by_parent[entry.parent]
        self.used_bytes -= entry.size

    def _delete(self, entry: _DiskFile) -> None:
        self._forget(entry)
        _unlink(self.path(entry.parent, entry.key))

    def _scan(self) -> None:
        """Index the folder's chunk files, least recently used first; drop stale temps
        and files of the earlier naming."""
        found = []
        now = time.time()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    stat = entry.stat()
                except OSError:
                    continue
                if match := _NAME.match(entry.name):
                    parent, key = bytes.fromhex(match[1]), int(match[2], 16)
                    found.append((stat.st_mtime, entry.name, _DiskFile(parent, key, stat.st_size)))
                elif _OLD_NAME.match(entry.name) or (
                    entry.name.endswith(".tmp") and now - stat.st_mtime > _STALE_TEMP_SECONDS
                ):
                    _unlink(Path(entry.path))
        for *_, entry in sorted(found, key=lambda item: item[:2]):
            self._index(entry)

    def _make_room(self, size: int) -> None:
        while self._lru and self.used_bytes + size > self.max_bytes:
            victim = next(iter(self._lru.values()))
            # A receiver that needs only the names (no tier below) is spared the read.
            wants_data = getattr(self.on_evict, "needs_data", True)
            chunk = self._read(victim) if self.on_evict is not None and wants_data else None
            if self._read_names(victim):
                self.evicted_blocks += len(victim.tokens) // self.layout.block_size
                if self.on_evict is not None and not wants_data:
                    chunk = KVChunk(victim.key, victim.parent, victim.start, victim.tokens, _NONE)
            self._delete(victim)
            if chunk is not None:
                self.on_evict(chunk)

    # -- files ------------------------------------------------------------------------

    def _read_names(self, entry: _DiskFile) -> bool:
        """Fill in ``entry``'s start and tokens from its file if not known yet; False
        (and the file gone) if it is unreadable."""
        if entry.tokens is None:
            head = self._guarded(entry, self._read_head)
            if head is None:
                return False
            entry.start, entry.tokens = head.start, head.tokens
        return True

    def _read(self, entry: _DiskFile) -> KVChunk | None:
        """The verified chunk in ``entry``'s file; None (and the file gone) if it is bad."""
        chunk = self._guarded(entry, self._read_chunk)
        if chunk is not None:
            entry.start, entry.tokens = chunk.start, chunk.tokens
            self._lru.move_to_end((entry.parent, entry.key))
            _touch(self.path(entry.parent, entry.key))
        return chunk

    def _guarded(self, entry: _DiskFile, read):
        path = self.path(entry.parent, entry.key)
        try:
            return read(entry, path)
        except FileNotFoundError:  # another engine evicted it
            self._forget(entry)
        except (OSError, ChunkFileError) as exc:
            logger.warning("discarding KV chunk file %s: %s", path, exc)
            self.failures += 1
            self._delete(entry)
        return None

    def _read_head(self, entry: _DiskFile, path: Path) -> ChunkHead:
        with open(path, "rb") as handle:
            raw = handle.read(PREFIX.size)
            length = header_length(raw)
            raw += handle.read(length + self.layout.chunk_size * TOKEN_DTYPE.itemsize)
        self.read_bytes += len(raw)
        head = decode_head(self.layout, raw)
        _check_names(entry, head.key, head.parent)
        return head

    def _read_chunk(self, entry: _DiskFile, path: Path) -> KVChunk:
        limit = self.layout.file_bytes(self.layout.shape[2]) + (1 << 16)
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise ChunkFileError(f"{size} bytes, larger than any chunk file")
            raw = bytearray(size)
            if handle.readinto(raw) != size:
                raise ChunkFileError("short read")
        self.read_bytes += size
        chunk = decode(self.layout, raw)
        _check_names(entry, chunk.key, chunk.parent)
        return chunk

    def _write(self, path: Path, pieces: list) -> bool:
        temp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temp, "wb") as handle:
                for piece in pieces:
                    handle.write(piece)
            os.replace(temp, path)
        except OSError as exc:
            self._write_warning(logger, "could not write KV chunk file %s: %s", path, exc)
            self.failures += 1
            _unlink(temp)
            return False
        return True


def _check_names(entry: _DiskFile, key: int, parent: bytes) -> None:
    if (key, parent) != (entry.key, entry.parent):
        raise ChunkFileError(f"holds chunk {key:016x} after {parent.hex()}, not its name's")


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


register_kv_tier("disk", DiskTier.from_context)
