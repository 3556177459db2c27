"""Tool-call parsing of each family's own format, streamed and whole; the tool list as
one segment rendered once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from chunking.segments import SegmentTokenizer
from prefixcache.tiny_templates import CHATML_TEMPLATE, HERMES_TEMPLATE, LLAMA3_TEMPLATE
from prefixcache.tools import CallEvent, ContentEvent, parser_for_template, parser_named

HERMES_REPLY = (
    "Let me look both up.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
LLAMA3_REPLY = (
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
    '{"name": "get_time", "parameters": {"zone": "CET"}}'
)
EXPECTED = [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]


def _calls(reply):
    return [(c.name, json.loads(c.arguments)) for c in reply.calls]


def _streamed(parser, text: str, step: int):
    events = []
    for at in range(0, len(text), step):
        events += parser.feed(text[at : at + step])
    return events + parser.finish()


def test_each_template_gets_its_family_parser():
    assert parser_for_template(HERMES_TEMPLATE).name == "hermes"
    assert parser_for_template(LLAMA3_TEMPLATE).name == "llama3_json"
    assert parser_for_template(CHATML_TEMPLATE) is None


@pytest.mark.parametrize(
    ("family", "text", "content"),
    [("hermes", HERMES_REPLY, "Let me look both up.\n\n"), ("llama3_json", LLAMA3_REPLY, "")],
)
def test_calls_parse_alike_whole_and_streamed_in_any_pieces(family, text, content):
    whole = parser_named(family)().parse(text)
    assert _calls(whole) == EXPECTED and whole.content == content
    for step in (1, 3, 7, len(text)):
        events = _streamed(parser_named(family)(), text, step)
        calls = [e for e in events if isinstance(e, CallEvent)]
        assert [(c.call.name, json.loads(c.call.arguments)) for c in calls] == EXPECTED
        assert [c.index for c in calls] == [0, 1]
        assert "".join(e.text for e in events if isinstance(e, ContentEvent)) == content
    assert len({c.id for c in whole.calls}) == 2  # every call gets its own id


def test_hermes_streams_text_before_a_call_at_once_and_holds_a_partial_tag():
    parser = parser_named("hermes")()
    assert parser.feed("Hello <tool") == [ContentEvent("Hello ")]
    assert parser.feed("_call>\n{") == []  # inside a call: nothing yet
    assert parser.finish() == [ContentEvent("<tool_call>\n{")]  # cut off: text, as written


@pytest.mark.parametrize(
    ("family", "text"),
    [
        ("hermes", "no calls here, just <b>text</b>"),
        ("hermes", '<tool_call>{"name": 5}</tool_call>'),
        ("llama3_json", 'Plain answer {"not": "a call"}'),
        ("llama3_json", '{"name": "f", "parameters": {"a": 1}} trailing words'),
        ("llama3_json", '{"name": "f", "parameters": '),
    ],
)
def test_text_that_is_not_a_call_is_kept_as_content(family, text):
    reply = parser_named(family)().parse(text)
    assert reply.calls == [] and reply.content == text


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": f"Does task number {i} and reports back.",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "note": {"type": "string"}},
                "required": ["x"],
            },
        },
    }
    for i in range(20)
]


def _whole(tokenizer, messages):
    ids = tokenizer.apply_chat_template(
        messages, tools=TOOLS, tokenize=True, add_generation_prompt=True
    )
    return ids if isinstance(ids, list) else ids["input_ids"]


@pytest.mark.parametrize(("arch", "style"), [("qwen2", "hermes"), ("llama", "llama3")])
def test_a_tool_list_is_rendered_once_and_tokenized_once(tiny_model_factory, arch, style):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory(arch, chat_style=style))
    segments = SegmentTokenizer(tokenizer)
    call = {"id": "c1", "type": "function", "function": {"name": "tool_3", "arguments": '{"x": 1}'}}
    conversation = [{"role": "user", "content": "Go"}]
    for _ in range(3):  # an agent's turns: same tools, one more exchange each
        ids = segments.encode_chat(conversation, tools=TOOLS)
        assert np.array_equal(ids, _whole(tokenizer, conversation))
        conversation += [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "done", "tool_call_id": "c1"},
        ]
    assert segments.tool_blocks.full_renders == 1 and segments.tool_blocks.splices > 0
    misses = segments.misses
    other = [{"role": "user", "content": "Other"}]  # a new conversation, the same tools
    assert np.array_equal(segments.encode_chat(other, tools=TOOLS), _whole(tokenizer, other))
    assert segments.misses == misses + 1  # only the piece with the new user turn
    first = segments.segments(other, True, tools=TOOLS)[0]
    assert all(t["function"]["name"] in first for t in TOOLS) and "Other" not in first
