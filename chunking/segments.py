"""Chat prompts rendered per message and tokenized once per distinct segment.

A conversation's prompt is the chat template over all its messages. Re-tokenizing a
200k-token history on every turn costs far more than the prefix-cache lookup, so
the rendered text is cut into segments and each segment's token ids are cached: a
new turn tokenizes only its new messages.

Cutting is only safe where tokenization cannot look across the cut. A cut right
before a special (added) token is such a place: tokenizers split added tokens out
before anything else runs. For a content-opaque template (``template_shape``) the
cuts are before every special token the template writes, found on one rendering with
short stand-ins for the contents, so the cost stays linear in a long conversation.
Other templates are cut where each message prefix's rendering ends, when the
conversation renders as an extension of its prefixes and those cuts fall on special
tokens; otherwise the whole text is tokenized.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from chunking.bounded import PromptTooLong, encode_bounded, piece_chars
from chunking.template_shape import STAND_IN, content_is_opaque, with_stand_ins
from chunking.tool_block import Rendered, ToolBlocks

DEFAULT_MAX_CACHED_TOKENS = 8_000_000


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's added (special) tokens, longest first."""
    return tuple(sorted(tokenizer.get_added_vocab(), key=len, reverse=True))


def encode_ids(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` (no BOS/EOS added) as an int32 array."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)


class SegmentTokenizer:
    """Token ids of chat prompts, equal to tokenizing the whole rendered text."""

    def __init__(self, tokenizer, max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.max_cached_tokens = max_cached_tokens
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_tokens = 0
        self._lock = threading.Lock()
        self._specials = special_tokens(tokenizer)
        self._opaque = content_is_opaque(tokenizer.chat_template) and bool(self._specials)
        self._special_pattern = re.compile("|".join(map(re.escape, self._specials)) or "(?!)")
        self._verified = False  # the first segmented prompt is checked against a whole encode
        self._unsafe = not self._specials
        self.tool_blocks = ToolBlocks(self._apply)
        self.hits = self.misses = self.fallbacks = 0

    def encode_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        max_tokens: int | None = None,
        tools: list | None = None,
    ):
        """Token ids of ``messages`` through the chat template, as an int32 array.

        With ``max_tokens``, ``PromptTooLong`` as soon as the segments tokenized so far
        hold more: a giant message costs about ``max_tokens`` of work, not its length.
        ``tools`` (function definitions the template renders) end a segment of their
        own where the template allows, so a turn with the same tools reuses their ids.
        """
        max_chars = piece_chars(max_tokens) if max_tokens is not None else None
        segments = None
        if not self._unsafe:
            segments = self.segments(messages, add_generation_prompt, max_chars, tools)
        if segments is None:
            self.fallbacks += 1
            return self._encode(self.render(messages, add_generation_prompt, tools), max_tokens)
        ids = np.concatenate(self._bounded_segment_ids(segments, max_tokens))
        if not self._verified:
            ids = self._verify(segments, ids)
        return ids

    def _bounded_segment_ids(self, segments: list[str], max_tokens: int | None) -> list[np.ndarray]:
        pieces, total = [], 0
        for text in segments:
            left = None if max_tokens is None else max_tokens - total
            try:
                ids = self._segment_ids(text, left)
            except PromptTooLong as exc:
                raise PromptTooLong(total + exc.counted, max_tokens) from None
            total += len(ids)
            if max_tokens is not None and total > max_tokens:
                raise PromptTooLong(total, max_tokens)
            pieces.append(ids)
        return pieces

    def _verify(self, segments: list[str], ids: np.ndarray) -> np.ndarray:
        """Belt and braces for the structural check: compare once with a whole encode."""
        whole = self._encode("".join(segments))
        self._verified = True
        if not np.array_equal(whole, ids):
            self._unsafe = True
            return whole
        return ids

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool, tools: list | None = None
    ) -> str:
        """The chat template's text for ``messages`` (and ``tools``)."""
        return self._rendered(messages, add_generation_prompt, tools).text

    def _rendered(self, messages, add_generation_prompt: bool, tools: list | None) -> Rendered:
        if not tools:
            return Rendered(self._apply(messages, add_generation_prompt, None), None)
        return self.tool_blocks.render(messages, add_generation_prompt, tools)

    def _render(self, messages, add_generation_prompt: bool, tools: list | None) -> str:
        """``render``, called with two arguments when there are no tools (as it always
        was, for whoever wraps it)."""
        if tools:
            return self.render(messages, add_generation_prompt, tools)
        return self.render(messages, add_generation_prompt)

    def _apply(self, messages, add_generation_prompt: bool, tools: list | None) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages),
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def segments(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool,
        max_chars: int | None = None,
        tools: list | None = None,
    ) -> list[str] | None:
        """The rendered text cut before special tokens: before each message's, or for a
        content-opaque template before every one the template writes (None when there is
        no safe cut). Past ``max_chars`` the quadratic search over every message prefix
        is not tried (None)."""
        if tools:
            full, tools_end = self.tool_blocks.render(messages, add_generation_prompt, tools)
        else:
            full, tools_end = self._render(messages, add_generation_prompt, None), None
        cuts = None
        if self._opaque:
            cuts = self._stand_in_cuts(messages, full, add_generation_prompt, tools)
        if cuts is None and max_chars is not None and len(full) > max_chars:
            return None  # a long text rendered once per message would cost far more
        if cuts is None:
            cuts = self._rendered_cuts(messages, full, tools)
        if not cuts:
            return None  # no safe place to cut: the whole text is one piece
        cuts = self._with_tools_cut(cuts, full, tools_end)
        bounds = [0, *cuts, len(full)]
        pieces = [full[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        if not all(piece.startswith(self._specials) for piece in pieces[1:]):
            return None
        return pieces

    def _with_tools_cut(self, cuts: list[int], full: str, tools_end: int | None) -> list[int]:
        """``cuts`` plus one at the first special token after the tool block, so the
        tools (with what the template writes before them) are a segment of their own."""
        if tools_end is None:
            return cuts
        found = self._special_pattern.search(full, tools_end)
        if found is None or found.start() == 0:
            return cuts
        return sorted({*cuts, found.start()})

    def _rendered_cuts(
        self, messages: Sequence[dict], full: str, tools: list | None = None
    ) -> list[int] | None:
        """Cut positions from rendering every prefix of the conversation (any template;
        quadratic in the number of messages)."""
        cuts = [0]
        for k in range(1, len(messages) + 1):
            prefix = self._render(messages[:k], False, tools)
            if not full.startswith(prefix) or len(prefix) < cuts[-1]:
                return None
            cuts.append(len(prefix))
        return cuts[1:]

    def _stand_in_cuts(
        self,
        messages: Sequence[dict],
        full: str,
        add_generation_prompt: bool,
        tools: list | None = None,
    ) -> list[int] | None:
        """Cuts before every special token the template itself writes, found on the
        conversation rendered once with short stand-ins for its contents (a
        content-opaque template) and mapped onto ``full``; None where that mapping is
        not certain. Linear in the conversation, however many messages it has."""
        if any(set(m) - {"role", "content"} for m in messages):
            return None  # stand-ins carry role and content only (no tool calls)
        stand_ins = with_stand_ins(messages)
        layout = _Layout.of(self._render(stand_ins, add_generation_prompt, tools))
        if not layout.align(full, [m["content"] for m in messages]):
            return None
        return layout.literal_cuts(self._special_pattern)

    def _segment_ids(self, text: str, max_tokens: int | None = None) -> np.ndarray:
        with self._lock:
            ids = self._cache.get(text)
            if ids is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return ids
        ids = self._encode(text, max_tokens)  # past max_tokens it raises: nothing cached
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

    def _encode(self, text: str, max_tokens: int | None = None) -> np.ndarray:
        if max_tokens is None:
            return encode_ids(self.tokenizer, text)
        return encode_bounded(self.tokenizer, text, max_tokens)


class _Layout:
    """A stand-in rendering cut into literal text and stand-ins, aligned with the real
    rendering: for a content-opaque template the real text is the same literals with
    each stand-in replaced by its content (possibly trimmed by the template)."""

    def __init__(self, text: str, pieces: list[tuple[int, int, int | None]]) -> None:
        self.text = text
        self.pieces = pieces  # (start in the stand-in text, length, message index or None)
        self.real_starts: list[int] = []

    @classmethod
    def of(cls, text: str) -> _Layout:
        head, _, tail = STAND_IN.partition("{}")
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
        pieces, at = [], 0
        for match in pattern.finditer(text):
            if match.start() > at:
                pieces.append((at, match.start() - at, None))
            pieces.append((match.start(), match.end() - match.start(), int(match.group(1))))
            at = match.end()
        if at < len(text):
            pieces.append((at, len(text) - at, None))
        return cls(text, pieces)

    def align(self, full: str, contents: list[str]) -> bool:
        """Find where each piece starts in ``full``; False unless exactly one way fits."""
        real = 0
        for k, (start, length, index) in enumerate(self.pieces):
            self.real_starts.append(real)
            if index is None:
                if not full.startswith(self.text[start : start + length], real):
                    return False
                real += length
                continue
            after = self._literal_after(k)
            fits = {
                len(form)
                for form in _printed_forms(contents[index])
                if full.startswith(form, real) and full.startswith(after, real + len(form))
            }
            if len(fits) != 1:
                return False
            real += fits.pop()
        return real == len(full)

    def literal_cuts(self, specials: re.Pattern) -> list[int]:
        """Real offsets of every special token inside the literal pieces (contents may
        hold special-token text too; cutting only at the template's own is enough)."""
        cuts = []
        for (start, length, index), real in zip(self.pieces, self.real_starts, strict=True):
            if index is None:
                literal = self.text[start : start + length]
                found = (real + m.start() for m in specials.finditer(literal))
                cuts.extend(cut for cut in found if cut > 0)
        return cuts

    def _literal_after(self, k: int) -> str:
        if k + 1 < len(self.pieces) and self.pieces[k + 1][2] is None:
            start, length, _ = self.pieces[k + 1]
            return self.text[start : start + length]
        return ""


def _printed_forms(content: str) -> set[str]:
    """What an opaque template may print for a content: as is, or trimmed."""
    return {content, content.strip()}
