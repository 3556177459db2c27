"""Tool-call parsers: one per model family, found from the chat template.

A parser reads a reply as it streams (``feed`` each new piece of text, ``finish`` at
the end) and turns it into events: plain text to pass on, and complete tool calls.
The same code parses a whole reply (``parse``), so streamed and non-streamed answers
agree. ``constraint`` gives the grammar that forces a reply to be one valid call (for
``tool_choice`` ``required`` or a named function).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from prefixcache.structured.spec import StructuredOutput
from prefixcache.tools.calls import CallEvent, ContentEvent, ParsedReply, ToolCall

_PARSERS: dict[str, type[ToolCallParser]] = {}


def register_parser(name: str) -> Callable[[type[ToolCallParser]], type[ToolCallParser]]:
    """Class decorator: make a parser findable by ``name`` and by its template check."""

    def register(cls: type[ToolCallParser]) -> type[ToolCallParser]:
        cls.name = name
        _PARSERS[name] = cls
        return cls

    return register


def parser_for_template(template: object) -> type[ToolCallParser] | None:
    """The parser whose call format ``template`` writes, or None when it writes none."""
    if not isinstance(template, str):
        return None
    for cls in _PARSERS.values():
        if cls.matches(template):
            return cls
    return None


def parser_named(name: str) -> type[ToolCallParser]:
    """The parser registered as ``name``; ValueError naming the known ones otherwise."""
    try:
        return _PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {sorted(_PARSERS)}") from None


class ToolCallParser:
    """Base of the streaming parsers. Subclasses implement ``matches``, ``_feed``,
    ``_finish`` and ``call_schema_key`` (the key holding the arguments)."""

    name = ""
    arguments_key = "arguments"

    def __init__(self) -> None:
        self._count = 0

    @classmethod
    def matches(cls, template: str) -> bool:
        """True when ``template`` writes this family's tool calls."""
        raise NotImplementedError

    def feed(self, text: str) -> list[ContentEvent | CallEvent]:
        """Events for the next piece of the reply (text that may still start a call is
        held back until it is known)."""
        return self._feed(text) if text else []

    def finish(self) -> list[ContentEvent | CallEvent]:
        """Events for whatever was held back, at the reply's end."""
        return self._finish()

    def parse(self, text: str) -> ParsedReply:
        """A whole reply's text outside calls, and its calls."""
        content, calls = [], []
        for event in [*self.feed(text), *self.finish()]:
            if isinstance(event, ContentEvent):
                content.append(event.text)
            else:
                calls.append(event.call)
        return ParsedReply("".join(content), calls)

    def _call(self, obj) -> CallEvent | None:
        """A call event for a decoded ``{"name": ..., <arguments_key>: {...}}``, or None."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get(self.arguments_key, obj.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        event = CallEvent(self._count, ToolCall.of(obj["name"], arguments))
        self._count += 1
        return event

    def _feed(self, text: str) -> list[ContentEvent | CallEvent]:
        raise NotImplementedError

    def _finish(self) -> list[ContentEvent | CallEvent]:
        raise NotImplementedError

    @classmethod
    def wrap_call(cls, call_schema: dict) -> StructuredOutput:
        """The constraint for one call whose JSON validates against ``call_schema``."""
        return StructuredOutput.json_schema(call_schema)

    @classmethod
    def constraint(cls, tools: Sequence[dict], name: str | None = None) -> StructuredOutput:
        """A reply that is exactly one call of one of ``tools`` (of ``name`` when given),
        its arguments valid against the function's parameters schema."""
        chosen = [t for t in tools if name is None or _name(t) == name]
        if not chosen:
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
        options = [_call_schema(t, cls.arguments_key) for t in chosen]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        try:
            return cls.wrap_call(schema)
        except RuntimeError as exc:  # xgrammar's refusal of a parameters schema
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise ValueError(f"cannot compile the tools' parameters schemas: {reason}") from None


def _name(tool: dict) -> str:
    return tool["function"]["name"]


def _call_schema(tool: dict, arguments_key: str) -> dict:
    """The JSON schema of one call of ``tool``: its name, then its arguments."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def decode_object(text: str):
    """The JSON value in ``text`` (surrounding blanks allowed), or None if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None
