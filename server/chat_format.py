"""Response bodies and stream chunks for each endpoint, built from a ``Tally``.

A format knows one endpoint's shapes; the streaming code and the routes only ask it
for "the response", "the chunks of new text", "the finish chunks" and "the usage
chunk". A chat request with tools parses its reply as it streams: text outside tool
calls goes out as content, each complete call as a tool-call delta, and a reply that
made calls and stopped finishes with ``tool_calls``.
"""

from __future__ import annotations

import time

import msgspec

from prefixcache.client import CallEvent, ContentEvent
from prefixcache.client import ToolCall as ParsedCall
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
from server.tools_protocol import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta


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

    def text_chunks(self, text: str) -> list[msgspec.Struct]:
        """The chunks carrying new text."""
        return [self.text_chunk(text)]

    def finish_chunks(self, finish_reason: str) -> list[msgspec.Struct]:
        """The chunks that end the choice."""
        return [self.finish_chunk(finish_reason)]


class ChatFormat(_Format):
    """``/v1/chat/completions`` bodies."""

    def __init__(self, state: ServerState, prepared: Prepared) -> None:
        super().__init__(state, prepared)
        parser = prepared.tool_parser
        self._parser = parser() if parser is not None else None
        self._num_calls = 0

    def response(self, tally: Tally) -> ChatCompletion:
        """The non-streaming response."""
        content, calls = tally.text, None
        if self._parser is not None:
            events = [*self._parser.feed(tally.text), *self._parser.finish()]
            content = "".join(e.text for e in self._kept(events) if isinstance(e, ContentEvent))
            calls = [_call(e.call) for e in events if isinstance(e, CallEvent)] or None
            content = content or (None if calls else "")
        message = AssistantMessage(content=content, tool_calls=calls)
        reason = _with_calls(tally.finish_reason, bool(calls))
        choice = ChatChoice(message=message, finish_reason=reason)
        return ChatCompletion(choices=[choice], usage=tally.usage(), **self._head())

    def text_chunks(self, text: str) -> list[ChatCompletionChunk]:
        """Content chunks, and with tools a tool-call chunk per call completed."""
        if self._parser is None:
            return [self.text_chunk(text)]
        return [self._event_chunk(e) for e in self._kept(self._parser.feed(text))]

    def finish_chunks(self, finish_reason: str) -> list[ChatCompletionChunk]:
        """What the parser held back, then the chunk that ends the choice."""
        chunks = []
        if self._parser is not None:
            chunks = [self._event_chunk(e) for e in self._kept(self._parser.finish())]
        return [*chunks, self.finish_chunk(_with_calls(finish_reason, self._num_calls > 0))]

    def _kept(self, events: list) -> list:
        """``events`` without blank text between or after calls (the template's own
        separators, not reply text)."""
        kept = []
        for event in events:
            if isinstance(event, CallEvent):
                self._num_calls += 1
            elif self._num_calls and not event.text.strip():
                continue
            kept.append(event)
        return kept

    def _event_chunk(self, event: ContentEvent | CallEvent) -> ChatCompletionChunk:
        if isinstance(event, ContentEvent):
            return self.text_chunk(event.text)
        call = event.call
        function = FunctionCallDelta(name=call.name, arguments=call.arguments)
        delta = ToolCallDelta(index=event.index, id=call.id, type="function", function=function)
        return self._chunk(ChatDelta(tool_calls=[delta]))

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


def _call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _with_calls(finish_reason: str | None, made_calls: bool) -> str | None:
    """A reply that made tool calls and stopped by itself finishes with ``tool_calls``."""
    return "tool_calls" if made_calls and finish_reason == "stop" else finish_reason


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
