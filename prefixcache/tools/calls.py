"""Tool calls as parsed from a model's output, and the events of parsing it as it streams."""

from __future__ import annotations

import json
import uuid
from typing import NamedTuple


def new_call_id() -> str:
    """A fresh id for one tool call (OpenAI's ``call_`` prefix)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(NamedTuple):
    """One function call: its id, the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    @classmethod
    def of(cls, name: str, arguments) -> ToolCall:
        """A call with a new id; ``arguments`` (a dict or JSON text) becomes JSON text."""
        text = (
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        )
        return cls(new_call_id(), name, text)


class ContentEvent(NamedTuple):
    """Plain reply text, outside any tool call."""

    text: str


class CallEvent(NamedTuple):
    """A complete tool call, the ``index``-th of the reply."""

    index: int
    call: ToolCall


class ParsedReply(NamedTuple):
    """A whole reply: its text outside tool calls, and the calls."""

    content: str
    calls: list[ToolCall]
