"""Tokenizer loading, end-of-sequence ids, and chat rendering."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

_ROLES = ("system", "user", "assistant", "tool", "developer")


def checked_tokens(ids, vocab_size: int) -> np.ndarray:
    """Validated token ids as an int32 array, in one vectorized pass.

    ``ids`` is a list of ints or an integer array; a 200k-token prompt takes well
    under a millisecond when it is already an array.
    """
    array = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    if array.size == 0:
        raise ValueError("prompt has no tokens")
    if array.ndim != 1 or array.dtype.kind not in "iu":
        bad = next((t for t in ids if type(t) is not int), ids[0])
        raise ValueError(f"token ids must be integers, got {bad!r}")
    if array.min() < 0 or array.max() >= vocab_size:  # two reductions, no temporaries
        outside = (array < 0) | (array >= vocab_size)
        bad = array[int(np.argmax(outside))]
        raise ValueError(f"token id {int(bad)!r} is outside the vocabulary [0, {vocab_size})")
    return np.ascontiguousarray(array, dtype=np.int32)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's Hugging Face tokenizer (fast when available)."""
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {folder}: {exc}") from exc


def eos_token_ids(folder: Path, tokenizer: PreTrainedTokenizerBase, config_eos) -> frozenset[int]:
    """End-of-sequence ids from generation_config.json, the tokenizer and config.json."""
    ids = set(config_eos)
    generation = folder / "generation_config.json"
    if generation.is_file():
        value = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def validate_messages(messages: Sequence[dict]) -> None:
    """Raise ValueError unless ``messages`` is a non-empty list of role/content dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if message.get("role") not in _ROLES:
            raise ValueError(f"message {i} has unknown role {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} content must be a string")
