"""Chat prompts rendered per message and tokenized once per distinct segment.

A conversation's prompt is the chat template over all its messages. Re-tokenizing a
200k-token history on every turn costs far more than the prefix-cache lookup, so
the rendered text is cut at message boundaries and each segment's token ids are
cached: a new turn tokenizes only its new messages.

Cutting is only safe where tokenization cannot look across the cut. A cut right
before a special (added) token is such a place: tokenizers split added tokens out
before anything else runs. Templates whose message segments do not start with one,
or that do not render each conversation as an extension of its shorter prefixes,
fall back to tokenizing the whole text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

DEFAULT_MAX_CACHED_TOKENS = 8_000_000


class SegmentTokenizer:
    """Token ids of chat prompts, equal to tokenizing the whole rendered text."""

    def __init__(self, tokenizer, max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.max_cached_tokens = max_cached_tokens
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_tokens = 0
        self._lock = threading.Lock()
        self._specials = tuple(sorted(tokenizer.get_added_vocab(), key=len, reverse=True))
        self._verified = False  # the first segmented prompt is checked against a whole encode
        self._unsafe = not self._specials
        self.hits = self.misses = self.fallbacks = 0

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True):
        """Token ids of ``messages`` through the chat template, as an int32 array."""
        segments = None if self._unsafe else self.segments(messages, add_generation_prompt)
        if segments is None:
            self.fallbacks += 1
            return self._encode(self.render(messages, add_generation_prompt))
        ids = np.concatenate([self._segment_ids(text) for text in segments])
        if not self._verified:
            ids = self._verify(segments, ids)
        return ids

    def _verify(self, segments: list[str], ids: np.ndarray) -> np.ndarray:
        """Belt and braces for the structural check: compare once with a whole encode."""
        whole = self._encode("".join(segments))
        self._verified = True
        if not np.array_equal(whole, ids):
            self._unsafe = True
            return whole
        return ids

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The chat template's text for ``messages``."""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[str] | None:
        """The rendered text cut before each message (None when cutting is unsafe)."""
        full = self.render(messages, add_generation_prompt)
        cuts = [0]
        for k in range(1, len(messages) + 1):
            prefix = self.render(messages[:k], False)
            if not full.startswith(prefix) or len(prefix) < cuts[-1]:
                return None
            cuts.append(len(prefix))
        cuts.append(len(full))
        pieces = [full[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        if not all(piece.startswith(self._specials) for piece in pieces[1:]):
            return None
        return pieces

    def _segment_ids(self, text: str) -> np.ndarray:
        with self._lock:
            ids = self._cache.get(text)
            if ids is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return ids
        ids = self._encode(text)
        with self._lock:
            self.misses += 1
            self._remember(text, ids)
        return ids

    def _remember(self, text: str, ids: np.ndarray) -> None:
        if len(ids) > self.max_cached_tokens or text in self._cache:
            return
        self._cache[text] = ids
        self._cached_tokens += len(ids)
        while self._cached_tokens > self.max_cached_tokens:
            _, dropped = self._cache.popitem(last=False)
            self._cached_tokens -= len(dropped)

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)
