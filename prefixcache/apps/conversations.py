"""Conversations that continue from a stored response (OpenAI's Responses API).

A stored response keeps its conversation's rendered text and token ids. The next
turn's cost should be the new message's, not the history's, so:

- When the chat template is content-opaque (``chunking.template_shape``), the
  history is rendered with short stand-ins for its contents: what the template
  adds after them is the new turn's text, appended to the stored text and ids
  without rendering or tokenizing the history again.
- Otherwise the whole conversation is rendered (cheap string work) and only the
  text past the stored text is tokenized.

Appending ids is exact only when the new text starts with a special token:
tokenizers split those out before anything else, so no token spans the cut.
Anywhere else (a tail starting with plain text, a template that rewrites earlier
text) the whole text is tokenized. The first append is also checked against a
whole encode; a mismatch turns appending off.

A turn's tokenizing stops once its prompt passes the context limit
(``PromptTooLong``), so a giant new message costs about the limit's work.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from chunking.bounded import PromptTooLong, encode_bounded
from chunking.segments import encode_ids, special_tokens
from chunking.template_shape import STAND_IN_MARK, content_is_opaque, with_stand_ins
from prefixcache.apps.response_store import ResponseStore, StoredResponse
from prefixcache.inputs.tokenizer import validate_messages
from prefixcache.sampling_params import SamplingParams

if TYPE_CHECKING:
    from prefixcache.inputs.processor import InputProcessor
    from prefixcache.sdk import Engine

Input = str | Sequence[dict]


@dataclass(slots=True)
class Turn:
    """A turn ready to run: its prompt ids, and what is needed to store it afterwards.

    ``base_text``/``base_ids`` are the conversation up to the new input without a
    generation prompt (None when the turn was appended to ``previous`` without
    rendering the history); the reply is appended to them once it is known.
    """

    messages: list[dict]
    instructions: str | None
    previous: StoredResponse | None
    base_text: str | None
    base_ids: np.ndarray | None
    prompt_ids: np.ndarray
    tools: list[dict] | None = None  # function tools the template renders

    @property
    def previous_id(self) -> str | None:
        """The id of the response this turn continues."""
        return self.previous.id if self.previous is not None else None


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

    def __init__(self, inputs: InputProcessor) -> None:
        self.inputs = inputs
        self.tokenizer = inputs.tokenizer
        self._specials = special_tokens(self.tokenizer)
        self._opaque = content_is_opaque(self.tokenizer.chat_template)
        self._verified, self._unsafe = False, not self._specials
        self.appends = self.full_renders = 0

    def turn(
        self,
        new: list[dict],
        previous: StoredResponse | None,
        instructions: str | None,
        limit: int | None = None,
        tools: list[dict] | None = None,
    ) -> Turn:
        """Prompt ids for ``new`` after ``previous``; equal to rendering it all at once.

        With ``limit`` (e.g. ``InputProcessor.max_prompt_tokens``), ``PromptTooLong``
        as soon as the prompt is known to pass it. With ``tools`` (or after a turn that
        had them) the conversation goes through the segment tokenizer, which renders
        the tool list once and reuses every unchanged segment's ids.
        """
        history = list(previous.messages) if previous is not None else []
        messages = history + new
        full = _with_instructions(messages, instructions)
        validate_messages(full)
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        if tools or (previous is not None and previous.tools):
            ids = self.inputs.chat_tokens(full, True, tools or None)
            return Turn(messages, instructions, previous, None, None, ids, tools or None)
        continued = previous is not None and previous.instructions == instructions
        if continued:
            appended = self.appended(previous, new, True, limit)
            if appended is not None:
                return Turn(messages, instructions, previous, None, None, appended[1])
        base_text = self._render(full, False)
        if continued:
            base_ids = self.extend(previous.text, previous.token_ids, base_text, limit)
        else:  # first turn, or new instructions replace the old system message
            base_ids = self.encode(base_text, limit)
        prompt_ids = self.extend(base_text, base_ids, self._render(full, True), limit)
        return Turn(messages, instructions, previous, base_text, base_ids, prompt_ids)

    def finish(
        self, turn: Turn, reply: str, message: dict | None = None
    ) -> tuple[list[dict], str, np.ndarray]:
        """The conversation after ``reply``: its messages, rendered text and token ids.
        ``message`` is the reply as an assistant message, when it is more than its text
        (tool calls)."""
        messages = turn.messages + [message or {"role": "assistant", "content": reply}]
        if turn.tools or (turn.previous is not None and turn.previous.tools):
            full = _with_instructions(messages, turn.instructions)
            text = self.inputs.segments.render(full, False, turn.tools)
            return messages, text, self.inputs.chat_tokens(full, False, turn.tools)
        if turn.base_text is None:
            new = messages[len(turn.previous.messages) :]
            appended = self.appended(turn.previous, new, False)
            if appended is not None:
                return messages, turn.previous.text + appended[0], appended[1]
        text = self._render(_with_instructions(messages, turn.instructions), False)
        if turn.base_text is None:
            return messages, text, self.encode(text)
        return messages, text, self.extend(turn.base_text, turn.base_ids, text)

    def appended(
        self,
        previous: StoredResponse,
        new: list[dict],
        add_generation_prompt: bool,
        limit: int | None = None,
    ) -> tuple[str, np.ndarray] | None:
        """``previous``'s conversation plus ``new`` as (text past the stored text, all ids),
        without rendering the stored contents; None where that is not known to be exact.
        ``PromptTooLong`` once the ids pass ``limit``.
        """
        if not self._opaque or self._unsafe:
            return None
        stand_ins = with_stand_ins(previous.messages)
        head = self._render(_with_instructions(stand_ins, previous.instructions), False)
        whole = _with_instructions(stand_ins + new, previous.instructions)
        rendered = self._render(whole, add_generation_prompt)
        tail = rendered[len(head) :]
        if not rendered.startswith(head) or STAND_IN_MARK in tail or not self._cuttable(tail):
            return None
        self.appends += 1
        ids = np.concatenate([previous.token_ids, self._tail(tail, previous.token_ids, limit)])
        if not self._verified:
            ids = self._verify(previous.text + tail, ids)
        return tail, ids

    def extend(
        self, text: str, ids: np.ndarray, new_text: str, limit: int | None = None
    ) -> np.ndarray:
        """Token ids of ``new_text``, given those of its prefix ``text`` where exact;
        ``PromptTooLong`` once they pass ``limit``."""
        tail = new_text[len(text) :]
        if self._unsafe or not text or not new_text.startswith(text) or not self._cuttable(tail):
            return self.encode(new_text, limit)
        self.appends += 1
        result = np.concatenate([ids, self._tail(tail, ids, limit)])
        if not self._verified:
            result = self._verify(new_text, result)
        return result

    def encode(self, text: str, limit: int | None = None) -> np.ndarray:
        """Token ids of a whole rendered text; ``PromptTooLong`` past ``limit`` tokens."""
        self.full_renders += 1
        if limit is None:
            return self._encode(text)
        return encode_bounded(self.tokenizer, text, limit)

    def _tail(self, tail: str, ids: np.ndarray, limit: int | None) -> np.ndarray:
        """Token ids of ``tail``, which follows ``ids``; the whole within ``limit``."""
        if limit is None:
            return self._encode(tail)
        try:
            return encode_bounded(self.tokenizer, tail, max(limit - len(ids), 0))
        except PromptTooLong as exc:
            raise PromptTooLong(len(ids) + exc.counted, limit) from None

    def _cuttable(self, tail: str) -> bool:
        """True when ``tail`` can be tokenized apart from the text before it."""
        return not tail or tail.startswith(self._specials)

    def _verify(self, text: str, ids: np.ndarray) -> np.ndarray:
        """Compare the first append with a whole encode; on a mismatch stop appending."""
        self._verified = True
        whole = self._encode(text)
        if not np.array_equal(whole, ids):
            self._unsafe = True
            return whole
        return ids

    def _encode(self, text: str) -> np.ndarray:
        return encode_ids(self.tokenizer, text)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.inputs.segments.render(messages, add_generation_prompt)


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
    message: dict | None = None,
) -> StoredResponse:
    """The store entry for a finished turn; ``counts`` = (input, cached, output) tokens;
    ``message`` the reply as an assistant message when it made tool calls."""
    messages, text, token_ids = renderer.finish(turn, reply, message)
    return StoredResponse(
        id=response_id,
        scope=scope,
        created_at=time.time(),
        messages=messages,
        text=text,
        tokens=token_ids.tobytes(),
        output_text=reply,
        instructions=turn.instructions,
        previous_response_id=turn.previous_id,
        finish_reason=finish_reason,
        num_input_tokens=counts[0],
        num_cached_tokens=counts[1],
        num_output_tokens=counts[2],
        tools=turn.tools,
    )


# ---------------------------------------------------------------------- the SDK


@dataclass(slots=True)
class ResponseSession:
    """The renderer and the store behind one SDK engine's ``respond``."""

    renderer: ConversationRenderer
    store: ResponseStore

    def respond(
        self,
        engine: Engine,
        input: Input,
        previous: ResponseOutput | StoredResponse | str | None = None,
        instructions: str | None = None,
        params: SamplingParams | None = None,
        salt: str | None = None,
    ) -> ResponseOutput:
        """Reply to ``input`` after ``previous`` on ``engine`` (see ``Engine.respond``)."""
        scope = salt or ""
        prev = _resolve_previous(self.store, previous, scope)
        limit = self.renderer.inputs.max_prompt_tokens
        turn = self.renderer.turn(input_messages(input), prev, instructions, limit)
        out = engine.generate(turn.prompt_ids, params or SamplingParams(), salt=salt)[0]
        counts = (len(out.prompt_token_ids), out.num_cached_tokens, len(out.token_ids))
        rid = new_response_id()
        entry = stored_response(
            self.renderer, turn, rid, scope, out.text, counts, out.finish_reason
        )
        self.store.put(entry)
        return ResponseOutput(
            rid, out.text, out.prompt_token_ids, out.token_ids, out.finish_reason,
            counts[0], counts[1], entry,
        )  # fmt: skip


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
