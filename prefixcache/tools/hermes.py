"""Hermes-style calls (Qwen 2/2.5/3, Hermes): ``<tool_call>{json}</tool_call>`` blocks.

Text outside the blocks is the reply's content. A block whose JSON does not decode
as a call is passed on as text, as the model wrote it.
"""

from __future__ import annotations

import xgrammar as xgr

from prefixcache.structured.compiler import json_schema_grammar
from prefixcache.structured.spec import StructuredOutput
from prefixcache.tools.calls import CallEvent, ContentEvent
from prefixcache.tools.parsers import ToolCallParser, decode_object, register_parser

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@register_parser("hermes")
class HermesParser(ToolCallParser):
    """Parses ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

    def __init__(self) -> None:
        super().__init__()
        self._held = ""
        self._in_call = False

    @classmethod
    def matches(cls, template: str) -> bool:
        """Qwen's and Hermes' templates write the ``<tool_call>`` tag."""
        return OPEN in template

    def _feed(self, text: str) -> list[ContentEvent | CallEvent]:
        self._held += text
        events: list[ContentEvent | CallEvent] = []
        while True:
            marker = CLOSE if self._in_call else OPEN
            at = self._held.find(marker)
            if at < 0:
                break
            before, self._held = self._held[:at], self._held[at + len(marker) :]
            events += self._call_events(before) if self._in_call else _content(before)
            self._in_call = not self._in_call
        if not self._in_call:  # pass on all but a tail that may begin the open tag
            keep = _partial_suffix(self._held, OPEN)
            events += _content(self._held[: len(self._held) - keep])
            self._held = self._held[len(self._held) - keep :]
        return events

    def _finish(self) -> list[ContentEvent | CallEvent]:
        held, self._held = self._held, ""
        if self._in_call:  # cut off before the close tag: a call if its JSON is whole
            self._in_call = False
            return self._call_events(held, closed=False)
        return _content(held)

    def _call_events(self, body: str, closed: bool = True) -> list[ContentEvent | CallEvent]:
        event = self._call(decode_object(body))
        if event is not None:
            return [event]
        return _content(OPEN + body + (CLOSE if closed else ""))

    @classmethod
    def wrap_call(cls, call_schema: dict) -> StructuredOutput:
        """``<tool_call>\\n{call}\\n</tool_call>``, as the template shows the model."""
        grammar = xgr.Grammar.concat(
            xgr.Grammar.from_ebnf(f'root ::= "{OPEN}\\n"'),
            json_schema_grammar(StructuredOutput.json_schema(call_schema).source),
            xgr.Grammar.from_ebnf(f'root ::= "\\n{CLOSE}"'),
        )
        return StructuredOutput.grammar(str(grammar))


def _content(text: str) -> list[ContentEvent]:
    return [ContentEvent(text)] if text else []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
