"""A conversation's tool list, rendered once and spliced into every later turn.

An agent sends the same 20-100 function definitions on every turn. Rendering them
through the chat template (``tojson`` over kilobytes of schemas) on each turn, and
on each message prefix the segment cutter renders, would cost more than the new
turn. So the first time a tool list is seen, the conversation is rendered twice:
with the real tools and with one marker tool whose name no template writes. Where
the two differ is the tool block (real) and its marker stand-in. Later turns render
with the marker tool only (a few hundred bytes) and put the real block in its place.

This is exact when the template writes the tool list once, whatever the messages:
the marker block must then occur exactly once in the marker rendering; when it does
not (a template that writes tools twice, or differently per message), that turn is
rendered with the real tools instead, as a template that is not understood always is.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

MARKER_NAME = f"tool_{uuid.uuid4().hex}"
_MARKER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": MARKER_NAME,
            "description": "",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
_MAX_LISTS = 64

Render = Callable[[Sequence[dict], bool, list | None], str]


class Rendered(NamedTuple):
    """A rendered conversation and where its tool block ends (None: not known)."""

    text: str
    tools_end: int | None


class ToolBlocks:
    """Tool lists' rendered blocks by digest (LRU), and the splicing of them.

    ``full_renders`` counts renderings with a real tool list, ``splices`` the turns
    that reused a block instead.
    """

    def __init__(self, render: Render) -> None:
        self._render = render
        self._blocks: OrderedDict[str, tuple[str, str] | None] = OrderedDict()
        self._lock = threading.Lock()
        self.full_renders = self.splices = 0

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool, tools: list
    ) -> Rendered:
        """``messages`` rendered with ``tools``, equal to the template's own rendering."""
        key = _digest(tools)
        with self._lock:
            known = key in self._blocks
            block = self._blocks.get(key)
            if known:
                self._blocks.move_to_end(key)
        if not known:
            return self._learn(key, messages, add_generation_prompt, tools)
        if block is not None:
            spliced = self._splice(messages, add_generation_prompt, block)
            if spliced is not None:
                return spliced
        self.full_renders += 1
        return Rendered(self._render(messages, add_generation_prompt, tools), None)

    def _learn(self, key: str, messages, add_generation_prompt: bool, tools: list) -> Rendered:
        real = self._render(messages, add_generation_prompt, tools)
        self.full_renders += 1
        try:
            marked = self._render(messages, add_generation_prompt, _MARKER_TOOLS)
        except Exception:  # a template that refuses the marker tool: never splice
            marked = None
        block = _difference(marked, real) if marked is not None else None
        with self._lock:
            self._blocks[key] = block
            while len(self._blocks) > _MAX_LISTS:
                self._blocks.popitem(last=False)
        end = None
        if block is not None:
            end = len(real) - (len(marked) - marked.index(block[0]) - len(block[0]))
        return Rendered(real, end)

    def _splice(self, messages, add_generation_prompt: bool, block: tuple[str, str]):
        marker_text, real_text = block
        try:
            marked = self._render(messages, add_generation_prompt, _MARKER_TOOLS)
        except Exception:
            return None
        at = marked.find(marker_text)
        if at < 0 or marked.find(marker_text, at + 1) >= 0:
            return None
        self.splices += 1
        text = marked[:at] + real_text + marked[at + len(marker_text) :]
        return Rendered(text, at + len(real_text))


def _difference(marked: str, real: str) -> tuple[str, str] | None:
    """The parts of ``marked`` and ``real`` between their common start and common end,
    widened to hold the marker tool's whole name (a real name may share its first
    letters); None unless that name occurs in ``marked`` once."""
    if marked.count(MARKER_NAME) != 1:
        return None
    name_at = marked.index(MARKER_NAME)
    limit = min(len(marked), len(real))
    start = 0
    while start < limit and marked[start] == real[start]:
        start += 1
    start = min(start, name_at)  # equal before ``start``: moving it back keeps them so
    end = 0
    while end < limit - start and marked[-1 - end] == real[-1 - end]:
        end += 1
    end = min(end, len(marked) - name_at - len(MARKER_NAME))
    return marked[start : len(marked) - end], real[start : len(real) - end]


def _digest(tools: list) -> str:
    text = json.dumps(tools, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
