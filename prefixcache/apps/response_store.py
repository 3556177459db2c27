"""Stored responses: what a later turn needs to continue a conversation.

Each entry keeps the conversation's messages, its rendered text and that text's token
ids (the prompt and the reply, as the chat template renders them), so the next turn
tokenizes only its new messages. Entries are scoped: a lookup under another scope
(another API key) finds nothing, exactly like an unknown id. The store is bounded by
entries and by tokens (least recently used go first) and entries expire after a TTL.
With a folder, every entry is also a file there and is loaded back on start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_TOKENS = 50_000_000
DEFAULT_TTL_S = 30 * 24 * 3600.0  # OpenAI keeps stored responses for 30 days
_SUFFIX = ".msgpack"


class StoredResponse(msgspec.Struct, kw_only=True):
    """One finished turn and the conversation it closes.

    ``messages`` excludes the turn's ``instructions`` (they are not carried over to the
    next turn, as in OpenAI's API). ``text`` is the chat template's rendering of
    ``messages`` (with the instructions as a system message) without a generation
    prompt, and ``tokens`` are its token ids as int32 bytes (``token_ids`` reads
    them as an array without a copy).
    """

    id: str
    scope: str
    created_at: float
    messages: list[dict]
    text: str
    tokens: bytes
    output_text: str
    instructions: str | None = None
    previous_response_id: str | None = None
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def token_ids(self) -> np.ndarray:
        """The conversation's token ids (read-only int32 view of ``tokens``)."""
        return np.frombuffer(self.tokens, dtype=np.int32)

    @property
    def num_tokens(self) -> int:
        """How many token ids the entry holds."""
        return len(self.tokens) // 4


class ResponseStore:
    """A bounded, scoped, optionally persistent map of response id to ``StoredResponse``.

    Thread-safe. ``clock`` gives seconds since the epoch (``created_at`` uses it too,
    so expiry survives a restart).
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        ttl_s: float = DEFAULT_TTL_S,
        folder: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_entries, self.max_tokens, self.ttl_s = max_entries, max_tokens, ttl_s
        self.folder = Path(folder) if folder is not None else None
        self.clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        """Token ids held over all entries."""
        return self._tokens

    def put(self, entry: StoredResponse) -> bool:
        """Keep ``entry`` (evicting the least recently used to fit); False if too big."""
        if entry.num_tokens > self.max_tokens:
            logger.info(
                "response %s (%d tokens) is over the store's token bound",
                entry.id,
                entry.num_tokens,
            )
            return False
        with self._lock:
            self._pop(entry.id)
            self._entries[entry.id] = entry
            self._tokens += entry.num_tokens
            self._write(entry)
            self._shrink()
        return True

    def get(self, response_id: str, scope: str) -> StoredResponse | None:
        """The entry, or None when unknown, expired, deleted or stored under another scope."""
        with self._lock:
            entry = self._live(response_id, scope)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str, scope: str) -> bool:
        """Forget an entry; False when ``get`` would not have found it."""
        with self._lock:
            if self._live(response_id, scope) is None:
                return False
            self._pop(response_id)
            return True

    # ----------------------------------------------------------------- helpers

    def _live(self, response_id: str, scope: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if self._expired(entry):
            self._pop(response_id)
            return None
        return entry if entry.scope == scope else None

    def _expired(self, entry: StoredResponse) -> bool:
        return self.clock() - entry.created_at >= self.ttl_s

    def _pop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._tokens -= entry.num_tokens
            self._unlink(response_id)

    def _shrink(self) -> None:
        """Drop expired entries, then least recently used ones, until within bounds."""
        for response_id in [k for k, e in self._entries.items() if self._expired(e)]:
            self._pop(response_id)
        while len(self._entries) > self.max_entries or self._tokens > self.max_tokens:
            self._pop(next(iter(self._entries)))

    # ------------------------------------------------------------- persistence

    def _path(self, response_id: str) -> Path | None:
        return None if self.folder is None else self.folder / (response_id + _SUFFIX)

    def _write(self, entry: StoredResponse) -> None:
        path = self._path(entry.id)
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.msgpack.encode(entry))
        os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one

    def _unlink(self, response_id: str) -> None:
        path = self._path(response_id)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _load(self) -> None:
        """Read back every entry file, oldest first, then enforce the bounds."""
        decoder = msgspec.msgpack.Decoder(StoredResponse)
        loaded = []
        for path in self.folder.glob("*" + _SUFFIX):
            try:
                entry = decoder.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError) as exc:
                logger.warning("skipping unreadable stored response %s: %r", path, exc)
                continue
            if path.name == entry.id + _SUFFIX:
                loaded.append(entry)
        for entry in sorted(loaded, key=lambda e: e.created_at):
            self._entries[entry.id] = entry
            self._tokens += entry.num_tokens
        self._shrink()
