"""Tokenizing with a token limit: a prompt past the limit costs about the limit's work.

Tokenizing a 20 MB text in full takes tens of seconds and gigabytes of tokenizer
state, only to find it is far over ``max_model_len``. Here a long text is tokenized
in pieces, cut before a space that follows a non-space, and given up on as soon as
the pieces hold more tokens than the limit allows; a text that fits is then
tokenized whole once, so its ids are exactly the whole text's.

Why counting pieces is sound: the tokenizers served here (byte-level BPE with a
regex pre-tokenizer, SentencePiece with whitespace splitting) never build a token
across the start of " word", so the tokens of the pieces are those of the whole,
except that a SentencePiece dummy prefix can add one per piece. The count allows two
extra tokens per cut, so a prompt that fits is never refused by the estimate.
"""

from __future__ import annotations

import numpy as np

_MIN_PIECE_CHARS = 4096
_CHARS_PER_LIMIT_TOKEN = 8  # piece length per allowed token: most texts fit in one piece
_SLACK_PER_CUT = 2


class PromptTooLong(ValueError):
    """A prompt holds more tokens than ``limit`` (``counted``: where tokenizing stopped).

    ``context`` names the limit that leaves no room, e.g. ``"max_model_len (4096)"``.
    """

    def __init__(self, counted: int, limit: int, context: str | None = None) -> None:
        self.counted, self.limit = counted, limit
        over = f"over {context}" if context else "no room for output"
        super().__init__(
            f"prompt is longer than {limit} tokens (tokenizing stopped after {counted}); "
            f"with at least one output token that is {over}"
        )


def piece_chars(limit: int) -> int:
    """How many characters one piece of a text is tokenized at a time for ``limit``."""
    return max(_MIN_PIECE_CHARS, _CHARS_PER_LIMIT_TOKEN * limit)


def encode_bounded(
    tokenizer, text: str, limit: int | None, add_special_tokens: bool = False
) -> np.ndarray:
    """Token ids of ``text`` as an int32 array; ``PromptTooLong`` past ``limit`` tokens.

    The work done is bounded by ``limit`` (plus one piece), however long the text.
    """
    encode = _encoder(tokenizer, add_special_tokens)
    step = piece_chars(limit) if limit is not None else len(text)
    if len(text) > step:
        _count_pieces(tokenizer, text, limit, step, add_special_tokens)
    ids = encode(text)
    if limit is not None and len(ids) > limit:
        raise PromptTooLong(len(ids), limit)
    return ids


def _encoder(tokenizer, add_special_tokens: bool):
    def encode(text: str) -> np.ndarray:
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return np.asarray(ids, np.int32)

    return encode


def _count_pieces(tokenizer, text: str, limit: int, step: int, add_special_tokens: bool) -> None:
    """Raise ``PromptTooLong`` as soon as the pieces of ``text`` hold over ``limit`` tokens."""
    counted = tokenizer.num_special_tokens_to_add() if add_special_tokens else 0
    start = cuts = 0
    while start < len(text):
        end = cut_before_word(text, start, start + step)
        counted += len(tokenizer.encode(text[start:end], add_special_tokens=False))
        if counted - _SLACK_PER_CUT * cuts > limit:
            raise PromptTooLong(counted - _SLACK_PER_CUT * cuts, limit)
        start, cuts = end, cuts + 1


def cut_before_word(text: str, start: int, end: int) -> int:
    """A cut in ``text[start:end]``, as late as possible before a space that follows a
    non-space (``end`` itself when the text ends first or no such space is near)."""
    if end >= len(text):
        return len(text)
    low = start + (end - start) // 2
    at = text.rfind(" ", low, end)
    while at > low and text[at - 1].isspace():
        at = text.rfind(" ", low, at - 1)
    return at if at > low else end
