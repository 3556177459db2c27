"""Turn a stream of token ids into a stream of text, and cut it at stop strings.

``IncrementalDetokenizer`` decodes only a short window of recent tokens per step and
holds back text while it still ends in a partial UTF-8 character. ``StopStringMatcher``
holds back a tail that might be the start of a stop string, so no part of a stop
string is ever streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes one token at a time, returning only the newly completed text.

    Invariant: ``tokens[:read_offset]`` has been emitted and ends on a whole
    character, and ``tokens[prefix_offset:read_offset]`` is the context decoded again
    each step so that decoders that look at neighbouring tokens (byte-level merges,
    leading-space rules) see the same thing a full decode would. Text ending in
    U+FFFD is held back: it is a character whose remaining bytes are still to come.

    The concatenation of every ``add`` and the final ``flush`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)`` for decoders whose output
    does not depend on text far behind the window (byte-level BPE, metaspace).
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """Append ``token_id``; return the text it completes (often "", never partial)."""
        self.token_ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._advance(prefix_text, new_text)

    def flush(self) -> str:
        """Return the held-back text, including any incomplete character as U+FFFD."""
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text):
            return ""
        return self._advance(prefix_text, new_text)

    def _decode_window(self) -> tuple[str, str]:
        """Decode the context alone, and the context followed by the unread tokens."""
        ids = self.token_ids
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        return prefix_text, self._decode(ids[self.prefix_offset :])

    def _advance(self, prefix_text: str, new_text: str) -> str:
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


class StopResult(NamedTuple):
    """Text that is safe to emit now, and whether a stop string ended the output."""

    text: str
    stopped: bool


class StopStringMatcher:
    """Cuts a text stream at the first stop string, never emitting any part of it.

    The match that completes first in the text wins (of two completing at the same
    character, the one starting earlier), and the output is the text before it. This
    is where generation would stop however the text was split into deltas, so the
    result does not depend on the split. A tail that is a proper prefix of some stop
    string is held back until the next delta shows whether it completes one.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(stop_strings)
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty, got {self.stop_strings!r}")
        self.stopped = False
        self._pending = ""

    def feed(self, delta: str) -> StopResult:
        """Add ``delta``; return the text that can be emitted and whether we stopped."""
        if self.stopped:
            return StopResult("", True)
        if not self.stop_strings:
            return StopResult(delta, False)
        text = self._pending + delta
        end = self._earliest_match(text)
        if end is not None:
            self._pending = ""
            self.stopped = True
            return StopResult(text[:end], True)
        cut = len(text) - self._partial_tail_length(text)
        self._pending = text[cut:]
        return StopResult(text[:cut], False)

    def flush(self) -> str:
        """Return the held-back tail when generation ends for another reason."""
        text, self._pending = self._pending, ""
        return text

    def _earliest_match(self, text: str) -> int | None:
        """Start of the stop string that completes first in ``text``, if any."""
        # (end, start) of each string's first occurrence; that occurrence also ends first.
        matches = [(i + len(s), i) for s in self.stop_strings if (i := text.find(s)) >= 0]
        return min(matches)[1] if matches else None

    def _partial_tail_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that some stop string starts with."""
        longest = max(len(s) for s in self.stop_strings) - 1
        for length in range(min(longest, len(text)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return length
        return 0
