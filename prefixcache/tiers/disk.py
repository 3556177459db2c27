"""The disk tier: one file per hash chunk, under a folder named by the model fingerprint.

Files are named by chunk hash (``{hash:016x}.kv``) and verified on every read (see
``kv_file``), so engines of another model, dtype or layout never share them, and a
corrupt, truncated or mismatched file is a miss: it is deleted and logged. Writes go
to a temporary file renamed into place, so a reader never sees half a file. The folder
is bounded by ``max_bytes``, evicting least recently used files first; recency lives
in memory and in file mtimes, so a restarted engine rebuilds it from the folder.
Several engines may share a folder: a file another engine wrote is found on lookup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from prefixcache.tiers.kv_file import ChunkFileError, ChunkLayout, ChunkRecord, decode, encode

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{16}\.kv$")
_STALE_TEMP_SECONDS = 3600.0  # older temp files are left over from a crash


class DiskTier:
    """Chunk files under ``root/<fingerprint>``, at most ``max_bytes`` in all, LRU-evicted."""

    def __init__(self, root: str | os.PathLike[str], layout: ChunkLayout, max_bytes: int) -> None:
        self.layout = layout
        self.max_bytes = max_bytes
        self.folder = Path(root) / layout.fingerprint
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"disk_cache_dir {str(root)!r} is not usable: {exc}") from None
        self.used_bytes = 0
        self.written_bytes = self.read_bytes = self.evicted_blocks = 0
        self._lru: OrderedDict[int, int] = OrderedDict()  # chunk hash -> file size, oldest first
        self._scan()
        self._make_room(0)

    @property
    def num_files(self) -> int:
        """Chunk files in the index."""
        return len(self._lru)

    def path(self, chunk_hash: int) -> Path:
        """Where the chunk ``chunk_hash`` lives."""
        return self.folder / f"{chunk_hash:016x}.kv"

    def contains(self, chunk_hash: int) -> bool:
        """True if a file for ``chunk_hash`` exists (one another engine wrote is adopted)."""
        if chunk_hash in self._lru:
            return True
        try:
            size = self.path(chunk_hash).stat().st_size
        except OSError:
            return False
        self._lru[chunk_hash] = size
        self.used_bytes += size
        self._make_room(0)
        return chunk_hash in self._lru

    def touch(self, chunk_hash: int) -> bool:
        """Mark ``chunk_hash`` recently used; False if there is no such file."""
        if not self.contains(chunk_hash):
            return False
        self._lru.move_to_end(chunk_hash)
        return True

    def put(self, record: ChunkRecord) -> bool:
        """Write a chunk unless it is there already; False if it was not written."""
        if self.touch(record.chunk_hash):
            return False
        pieces = encode(self.layout, record)
        size = sum(len(p) for p in pieces)
        if size > self.max_bytes:
            return False
        self._make_room(size)
        if not self._write(self.path(record.chunk_hash), pieces):
            return False
        self._lru[record.chunk_hash] = size
        self.used_bytes += size
        self.written_bytes += size
        return True

    def read(self, chunk_hash: int) -> ChunkRecord | None:
        """The verified chunk ``chunk_hash``, or None; a bad file is deleted and logged."""
        if not self.contains(chunk_hash):
            return None
        path = self.path(chunk_hash)
        try:
            raw = self._read_bytes(path)
            record = decode(self.layout, raw)
            if record.chunk_hash != chunk_hash:
                raise ChunkFileError(f"holds chunk {record.chunk_hash:016x}")
        except FileNotFoundError:  # another engine evicted it
            self._forget(chunk_hash)
            return None
        except (OSError, ChunkFileError) as exc:
            logger.warning("discarding KV chunk file %s: %s", path, exc)
            self.discard(chunk_hash)
            return None
        self.read_bytes += len(raw)
        self._lru.move_to_end(chunk_hash)
        _touch(path)
        return record

    def discard(self, chunk_hash: int) -> None:
        """Delete the file of ``chunk_hash`` (if any) and forget it."""
        self._forget(chunk_hash)
        _unlink(self.path(chunk_hash))

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless the index adds up and respects the bound."""
        assert self.used_bytes == sum(self._lru.values()), "disk byte count out of step"
        assert self.used_bytes <= self.max_bytes, (
            f"disk tier holds {self.used_bytes} bytes, over its bound of {self.max_bytes}"
        )

    # -- files ------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the folder's chunk files, least recently used first; drop stale temps."""
        found = []
        now = time.time()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    stat = entry.stat()
                except OSError:
                    continue
                if _NAME.match(entry.name):
                    found.append((stat.st_mtime, int(entry.name[:16], 16), stat.st_size))
                elif entry.name.endswith(".tmp") and now - stat.st_mtime > _STALE_TEMP_SECONDS:
                    _unlink(Path(entry.path))
        for _, chunk_hash, size in sorted(found):
            self._lru[chunk_hash] = size
            self.used_bytes += size

    def _make_room(self, size: int) -> None:
        while self._lru and self.used_bytes + size > self.max_bytes:
            chunk_hash = next(iter(self._lru))
            self.discard(chunk_hash)
            self.evicted_blocks += self.layout.shape[2]

    def _write(self, path: Path, pieces: list) -> bool:
        temp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temp, "wb") as handle:
                for piece in pieces:
                    handle.write(piece)
            os.replace(temp, path)
        except OSError as exc:
            logger.warning("could not write KV chunk file %s: %s", path, exc)
            _unlink(temp)
            return False
        return True

    def _read_bytes(self, path: Path) -> bytearray:
        limit = self.layout.file_bytes + (1 << 16)
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise ChunkFileError(f"{size} bytes, larger than any chunk file")
            raw = bytearray(size)
            if handle.readinto(raw) != size:
                raise ChunkFileError("short read")
        return raw

    def _forget(self, chunk_hash: int) -> None:
        size = self._lru.pop(chunk_hash, None)
        if size is not None:
            self.used_bytes -= size


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
