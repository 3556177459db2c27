"""Response bodies and stream chunks for each endpoint, built from a ``Tally``.

A format knows one endpoint's shapes; the streaming code and the routes only ask it
for "the response", "a text chunk", "the finish chunk" and "the usage chunk".
"""

from __future__ import annotations

import time

import msgspec

from server.chat_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    Usage,
)
from server.generation import Tally
from server.prepare import Prepared
from server.state import ServerState


class _Format:
    """Identity fields every body of one request repeats."""

    def __init__(self, state: ServerState, prepared: Prepared) -> None:
        self.id = prepared.request_id
        self.created = int(time.time())
        self.model = state.model_name
        self.fingerprint = state.fingerprint

    def _head(self) -> dict:
        return {
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def first_chunk(self) -> msgspec.Struct | None:
        """The chunk sent before any token (None: send nothing)."""
        return None


class ChatFormat(_Format):
    """``/v1/chat/completions`` bodies."""

    def response(self, tally: Tally) -> ChatCompletion:
        """The non-streaming response."""
        choice = ChatChoice(
            message=AssistantMessage(content=tally.text), finish_reason=tally.finish_reason
        )
        return ChatCompletion(choices=[choice], usage=tally.usage(), **self._head())

    def _chunk(self, delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(choices=[choice], **self._head())

    def first_chunk(self) -> ChatCompletionChunk:
        """OpenAI opens a chat stream with the role and empty content."""
        return self._chunk(ChatDelta(role="assistant", content=""))

    def text_chunk(self, text: str) -> ChatCompletionChunk:
        """A chunk carrying new reply text."""
        return self._chunk(ChatDelta(content=text))

    def finish_chunk(self, finish_reason: str) -> ChatCompletionChunk:
        """The chunk that ends the choice."""
        return self._chunk(ChatDelta(), finish_reason)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return ChatCompletionChunk(choices=[], usage=usage, **self._head())


class CompletionFormat(_Format):
    """``/v1/completions`` bodies."""

    def response(self, tally: Tally) -> Completion:
        """The non-streaming response."""
        choice = CompletionChoice(text=tally.text, finish_reason=tally.finish_reason)
        return Completion(choices=[choice], usage=tally.usage(), **self._head())

    def text_chunk(self, text: str) -> Completion:
        """A chunk carrying new text."""
        return Completion(choices=[CompletionChoice(text=text)], **self._head())

    def finish_chunk(self, finish_reason: str) -> Completion:
        """The chunk that ends the choice."""
        choice = CompletionChoice(text="", finish_reason=finish_reason)
        return Completion(choices=[choice], **self._head())

    def usage_chunk(self, usage: Usage) -> Completion:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return Completion(choices=[], usage=usage, **self._head())
