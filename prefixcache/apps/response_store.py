"""Stored responses: what a later turn needs to continue a conversation.

Each entry keeps the conversation's messages, its rendered text and that text's token
ids (the prompt and the reply, as the chat template renders them), so the next turn
tokenizes only its new messages. Entries are scoped: a lookup under another scope
(another API key) finds nothing, exactly like an unknown id. The store is bounded by
entries and by tokens, per scope and in total, and entries expire after a TTL. A
scope over its own bound loses its least recently used entries; when the total is
over, the largest scope loses its least recently used, so one tenant's flood never
evicts another tenant's entries while it holds more than they do.

With a folder, every entry is also a file there, written before the entry is kept
and loaded back on start. A failed write (a full disk) keeps nothing and leaves no
temporary file (``ResponseNotStored``); leftovers of a crash are removed on start.
Write failures are logged at most once a minute, with a count of the rest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

from prefixcache.logs import ThrottledWarning

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_TOKENS = 50_000_000
DEFAULT_TTL_S = 30 * 24 * 3600.0  # OpenAI keeps stored responses for 30 days
_SUFFIX = ".msgpack"
_TMP_SUFFIX = ".tmp"
WARN_INTERVAL_S = 60.0


class ResponseNotStored(Exception):
    """Writing a response to the store's folder failed (``disk_full`` for ENOSPC or a
    quota); nothing was kept. The message says so without naming any path."""

    def __init__(self, response_id: str, cause: OSError) -> None:
        self.response_id = response_id
        self.disk_full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "the disk is full" if self.disk_full else (cause.strerror or "a write error")
        super().__init__(f"the response was not stored: {reason}")


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
    tools: list[dict] | None = None  # function tools ``text`` was rendered with

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
    so expiry survives a restart). Per-scope bounds default to the total ones.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        ttl_s: float = DEFAULT_TTL_S,
        folder: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        *,
        max_entries_per_scope: int | None = None,
        max_tokens_per_scope: int | None = None,
    ) -> None:
        _check_positive(max_entries=max_entries, max_tokens=max_tokens)
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_entries, self.max_tokens, self.ttl_s = max_entries, max_tokens, ttl_s
        self.max_entries_per_scope = min(max_entries_per_scope or max_entries, max_entries)
        self.max_tokens_per_scope = min(max_tokens_per_scope or max_tokens, max_tokens)
        _check_positive(
            max_entries_per_scope=self.max_entries_per_scope,
            max_tokens_per_scope=self.max_tokens_per_scope,
        )
        self.folder = Path(folder) if folder is not None else None
        self.clock = clock
        self._entries: dict[str, StoredResponse] = {}
        self._scopes: dict[str, _Scope] = {}
        self._tokens = 0
        self._lock = threading.Lock()
        self._warn = ThrottledWarning(WARN_INTERVAL_S)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        """Token ids held over all entries."""
        return self._tokens

    def usage(self, scope: str) -> tuple[int, int]:
        """Entries and token ids held for ``scope``."""
        with self._lock:
            held = self._scopes.get(scope)
            return (len(held.ids), held.tokens) if held is not None else (0, 0)

    def put(self, entry: StoredResponse) -> bool:
        """Keep ``entry`` (evicting to fit); False if it is over a token bound.

        With a folder the file is written first: ``ResponseNotStored`` when that fails,
        and then nothing is kept (a later ``get`` does not find the entry).
        """
        if entry.num_tokens > self.max_tokens_per_scope:
            logger.info(
                "response %s (%d tokens) is over the store's token bound",
                entry.id,
                entry.num_tokens,
            )
            return False
        with self._lock:
            self._write(entry)
            self._pop(entry.id, unlink=False)
            self._add(entry)
            self._shrink(entry.scope)
        return True

    def get(self, response_id: str, scope: str) -> StoredResponse | None:
        """The entry, or None when unknown, expired, deleted or stored under another scope."""
        with self._lock:
            entry = self._live(response_id, scope)
            if entry is not None:
                self._scopes[scope].ids.move_to_end(response_id)
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

    def _add(self, entry: StoredResponse) -> None:
        self._entries[entry.id] = entry
        self._scopes.setdefault(entry.scope, _Scope()).add(entry)
        self._tokens += entry.num_tokens

    def _pop(self, response_id: str, unlink: bool = True) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return
        self._tokens -= entry.num_tokens
        scope = self._scopes[entry.scope]
        scope.remove(entry)
        if not scope.ids:
            del self._scopes[entry.scope]
        if unlink:
            self._unlink(response_id)

    def _shrink(self, scope: str) -> None:
        """Drop expired entries, then ``scope``'s least recently used while it is over its
        bounds, then the largest scope's while the total is over."""
        for response_id in [k for k, e in self._entries.items() if self._expired(e)]:
            self._pop(response_id)
        own = self._scopes.get(scope)
        while own is not None and own.over(self.max_entries_per_scope, self.max_tokens_per_scope):
            self._pop(own.oldest)
        while len(self._entries) > self.max_entries:
            self._pop(max(self._scopes.values(), key=lambda s: len(s.ids)).oldest)
        while self._tokens > self.max_tokens:
            self._pop(max(self._scopes.values(), key=lambda s: s.tokens).oldest)

    # ------------------------------------------------------------- persistence

    def _path(self, response_id: str) -> Path | None:
        return None if self.folder is None else self.folder / (response_id + _SUFFIX)

    def _write(self, entry: StoredResponse) -> None:
        path = self._path(entry.id)
        if path is None:
            return
        tmp = path.with_suffix(_TMP_SUFFIX)
        try:
            tmp.write_bytes(msgspec.msgpack.encode(entry))
            os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._warn(logger, "cannot store response %s: %s", entry.id, exc)
            raise ResponseNotStored(entry.id, exc) from exc

    def _unlink(self, response_id: str) -> None:
        path = self._path(response_id)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _load(self) -> None:
        """Remove temporary files a crash left, read back every entry file oldest
        first, then enforce the bounds."""
        for path in self.folder.glob("*" + _TMP_SUFFIX):
            with contextlib.suppress(OSError):
                path.unlink()
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
            self._add(entry)
            self._shrink(entry.scope)


class _Scope:
    """One scope's entries in least-recently-used order, and their token count."""

    __slots__ = ("ids", "tokens")

    def __init__(self) -> None:
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.tokens = 0

    @property
    def oldest(self) -> str:
        """The least recently used entry's id."""
        return next(iter(self.ids))

    def add(self, entry: StoredResponse) -> None:
        self.ids[entry.id] = None
        self.tokens += entry.num_tokens

    def remove(self, entry: StoredResponse) -> None:
        del self.ids[entry.id]
        self.tokens -= entry.num_tokens

    def over(self, max_entries: int, max_tokens: int) -> bool:
        return len(self.ids) > max_entries or self.tokens > max_tokens


def _check_positive(**bounds: int) -> None:
    for name, value in bounds.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
