"""Llama 3.1-style calls: the reply is a bare JSON object ``{"name", "parameters"}``
(several separated by ``;``), optionally after ``<|python_tag|>``.

A reply that starts with ``{`` (after blanks) is held until its end and parsed as
calls; if it does not parse, it is passed on as the text it was. Any other reply is
plain content, streamed as it comes.
"""

from __future__ import annotations

import json

from prefixcache.tools.calls import CallEvent, ContentEvent
from prefixcache.tools.parsers import ToolCallParser, register_parser

PYTHON_TAG = "<|python_tag|>"


@register_parser("llama3_json")
class Llama3JsonParser(ToolCallParser):
    """Parses Llama 3.1's JSON tool calls."""

    arguments_key = "parameters"

    def __init__(self) -> None:
        super().__init__()
        self._held = ""
        self._mode: str | None = None  # "calls" or "content" once the start is seen

    @classmethod
    def matches(cls, template: str) -> bool:
        """Llama 3.1's template asks for ``"parameters"`` and runs results as ``ipython``."""
        return "ipython" in template and '"parameters"' in template

    def _feed(self, text: str) -> list[ContentEvent | CallEvent]:
        self._held += text
        if self._mode is None:
            start = self._held.lstrip()
            if not start or PYTHON_TAG.startswith(start):
                return []  # too early to tell
            self._mode = "calls" if start.startswith(("{", PYTHON_TAG)) else "content"
        if self._mode == "calls":
            return []
        held, self._held = self._held, ""
        return [ContentEvent(held)]

    def _finish(self) -> list[ContentEvent | CallEvent]:
        held, self._held = self._held, ""
        if self._mode == "calls":
            calls = self._calls(held.strip().removeprefix(PYTHON_TAG))
            if calls:
                return calls
        return [ContentEvent(held)] if held else []

    def _calls(self, text: str) -> list[CallEvent]:
        """Every ``{...}`` object in ``text`` (separated by ``;`` or blanks) as calls;
        none unless all of ``text`` is such objects."""
        decoder, at, objects = json.JSONDecoder(), 0, []
        while at < len(text):
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return []
            objects.append(obj)
            while at < len(text) and text[at] in "; \n\t":
                at += 1
        calls = [self._call(obj) for obj in objects]
        return calls if calls and all(c is not None for c in calls) else []
