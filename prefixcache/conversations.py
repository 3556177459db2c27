"""Conversations that continue from a stored response (OpenAI's Responses API).

A stored response keeps its conversation's rendered text and token ids. The next
turn renders the whole conversation (cheap string work) but tokenizes only the text
past the stored text, so its cost is the new message's, not the history's. That
is exact when the new text starts with a special token: tokenizers split those out
before anything else, so no token spans the cut. Anywhere else (a template that
rewrites earlier text, a tail starting with plain text) the whole text is tokenized.
"""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefixcache.response_store import ResponseStore, StoredResponse
from prefixcache.sampling_params import SamplingParams
from prefixcache.tokenizer import validate_messages

if TYPE_CHECKING:
    from prefixcache.engine import Engine

Input = str | Sequence[dict]
_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class Turn:
    """A turn ready to run: its prompt ids, and what is needed to store it afterwards.

    ``base_text``/``base_ids`` are the conversation up to the new input without a
    generation prompt; the reply is appended to them once it is known.
    """

    messages: list[dict]
    instructions: str | None
    previous_id: str | None
    base_text: str
    base_ids: list[int]
    prompt_ids: list[int]


@dataclass(slots=True)
class ResponseOutput:
    """One reply of ``Engine.respond``; pass it (or its ``id``) as the next ``previous``."""

    id: str
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    num_input_tokens: int
    num_cached_tokens: int
    stored: StoredResponse

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated for the reply."""
        return len(self.token_ids)

    @property
    def total_tokens(self) -> int:
        """Prompt plus reply tokens."""
        return self.num_input_tokens + self.num_output_tokens


def input_messages(value: Input) -> list[dict]:
    """A turn's new messages: a string is one user message. ValueError on bad input."""
    if isinstance(value, str):
        if not value:
            raise ValueError("input is empty")
        return [{"role": "user", "content": value}]
    messages = [dict(m) if isinstance(m, dict) else m for m in value]
    validate_messages(messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ConversationRenderer:
    """Renders turns on one engine's tokenizer and chat template, appending where exact."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        vocab = self.tokenizer.get_added_vocab()
        self._specials = tuple(sorted(vocab, key=len, reverse=True))
        # The first append is checked against a whole encode; a mismatch turns appends off.
        self._verified, self._unsafe = False, not self._specials
        self.appends = self.full_renders = 0

    def turn(
        self, new: list[dict], previous: StoredResponse | None, instructions: str | None
    ) -> Turn:
        """Prompt ids for ``new`` after ``previous``; equal to rendering it all at once."""
        history = list(previous.messages) if previous is not None else []
        messages = history + new
        full = _with_instructions(messages, instructions)
        validate_messages(full)
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        base_text = self._render(full, False)
        if previous is not None and previous.instructions == instructions:
            base_ids = self.extend(previous.text, previous.token_ids, base_text)
        else:  # first turn, or new instructions replace the old system message
            base_ids = self.encode(base_text)
        prompt_ids = self.extend(base_text, base_ids, self._render(full, True))
        previous_id = previous.id if previous is not None else None
        return Turn(messages, instructions, previous_id, base_text, base_ids, prompt_ids)

    def finish(self, turn: Turn, reply: str) -> tuple[list[dict], str, list[int]]:
        """The conversation after ``reply``: its messages, rendered text and token ids."""
        messages = turn.messages + [{"role": "assistant", "content": reply}]
        text = self._render(_with_instructions(messages, turn.instructions), False)
        return messages, text, self.extend(turn.base_text, turn.base_ids, text)

    def extend(self, text: str, ids: list[int], new_text: str) -> list[int]:
        """Token ids of ``new_text``, given those of its prefix ``text`` where exact."""
        tail = new_text[len(text) :]
        if self._unsafe or not text or not new_text.startswith(text):
            return self.encode(new_text)
        if tail and not tail.startswith(self._specials):
            return self.encode(new_text)
        self.appends += 1
        result = ids + self._encode(tail) if tail else list(ids)
        if not self._verified:
            self._verified = True
            whole = self._encode(new_text)
            if whole != result:
                self._unsafe, result = True, whole
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of a whole rendered text."""
        self.full_renders += 1
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.engine.segments.render(messages, add_generation_prompt)


def _with_instructions(messages: list[dict], instructions: str | None) -> list[dict]:
    if not instructions:
        return messages
    return [{"role": "system", "content": instructions}] + messages


def new_response_id() -> str:
    """A fresh response id (``resp_`` and 32 hex digits, like OpenAI's)."""
    return "resp_" + uuid.uuid4().hex


def stored_response(
    renderer: ConversationRenderer,
    turn: Turn,
    response_id: str,
    scope: str,
    reply: str,
    counts: tuple[int, int, int],
    finish_reason: str | None,
) -> StoredResponse:
    """The store entry for a finished turn; ``counts`` = (input, cached, output) tokens."""
    messages, text, token_ids = renderer.finish(turn, reply)
    return StoredResponse(
        id=response_id,
        scope=scope,
        created_at=time.time(),
        messages=messages,
        text=text,
        token_ids=token_ids,
        output_text=reply,
        instructions=turn.instructions,
        previous_response_id=turn.previous_id,
        finish_reason=finish_reason,
        num_input_tokens=counts[0],
        num_cached_tokens=counts[1],
        num_output_tokens=counts[2],
    )


# ---------------------------------------------------------------------- the SDK


def session(engine: Engine) -> tuple[ConversationRenderer, ResponseStore]:
    """The renderer and the store behind ``engine.respond`` (made on first use)."""
    if engine not in _STORES:
        _STORES[engine] = (ConversationRenderer(engine), ResponseStore())
    return _STORES[engine]


def respond(
    engine: Engine,
    input: Input,
    previous: ResponseOutput | StoredResponse | str | None = None,
    instructions: str | None = None,
    params: SamplingParams | None = None,
    salt: str | None = None,
) -> ResponseOutput:
    """Reply to ``input`` in the conversation ending at ``previous`` (see ``Engine.respond``)."""
    renderer, store = session(engine)
    scope = salt or ""
    prev = _resolve_previous(store, previous, scope)
    turn = renderer.turn(input_messages(input), prev, instructions)
    out = engine.generate(turn.prompt_ids, params or SamplingParams(), salt=salt)[0]
    counts = (len(out.prompt_token_ids), out.num_cached_tokens, len(out.token_ids))
    rid = new_response_id()
    entry = stored_response(renderer, turn, rid, scope, out.text, counts, out.finish_reason)
    store.put(entry)
    return ResponseOutput(
        rid,
        out.text,
        out.prompt_token_ids,
        out.token_ids,
        out.finish_reason,
        counts[0],
        counts[1],
        entry,
    )


def _resolve_previous(
    store: ResponseStore, previous: ResponseOutput | StoredResponse | str | None, scope: str
) -> StoredResponse | None:
    if previous is None or isinstance(previous, StoredResponse):
        return previous
    if isinstance(previous, ResponseOutput):
        return previous.stored
    entry = store.get(previous, scope) if isinstance(previous, str) else None
    if entry is None:
        raise ValueError(f"previous response {previous!r} not found")
    return entry
