"""Structured outputs and tool calling through the HTTP server, with the openai client."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import jsonschema
import openai
import pytest
from server_harness import running_server
from structured_cases import random_schema

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city for the next days.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": "Set an alarm.",
            "parameters": {
                "type": "object",
                "properties": {"hour": {"enum": [6, 7, 8]}, "loud": {"type": "boolean"}},
                "required": ["hour", "loud"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What will the weather be?"}]


@pytest.fixture(scope="module", params=[("qwen2", "hermes"), ("llama", "llama3")], ids=str)
def served(request, tiny_model_factory):
    arch, style = request.param
    folder = tiny_model_factory(arch, chat_style=style)
    with running_server(str(folder), engine_options={"kv_cache_tokens": 16384}) as server:
        yield server


@pytest.fixture(scope="module")
def json_served(tiny_model_factory):
    """One server for the randomized schemas (the template does not matter to them)."""
    folder = tiny_model_factory("qwen2", chat_style="hermes")
    with running_server(str(folder), engine_options={"kv_cache_tokens": 16384}) as server:
        yield server


def _client(served) -> openai.OpenAI:
    http = httpx.Client(trust_env=False, timeout=120)
    return openai.OpenAI(base_url=served.api_url, api_key="x", max_retries=0, http_client=http)


def _async_client(served) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(trust_env=False, timeout=300)
    return openai.AsyncOpenAI(base_url=served.api_url, api_key="x", max_retries=0, http_client=http)


async def _schema_answer(client, schema: dict, stream: bool, seed: int) -> tuple[str, str]:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    kwargs = {"model": "tiny", "messages": ASK, "response_format": fmt, "max_tokens": 300}
    kwargs |= {"temperature": 0.8, "seed": seed}
    if not stream:
        reply = await client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_fifty_random_schemas_validate_streamed_and_not(json_served):
    served = json_served
    schemas = [random_schema(random.Random(seed)) for seed in range(50)]

    async def run_all():
        client = _async_client(served)
        jobs = [
            _schema_answer(client, s, stream, i) for i, s in enumerate(schemas) for stream in (0, 1)
        ]
        return await asyncio.gather(*jobs)

    answers = asyncio.run(run_all())
    for k, (text, finish) in enumerate(answers):
        assert finish == "stop", (text, finish)
        jsonschema.validate(json.loads(text), schemas[k // 2])
    # A seeded request samples the same streamed or not, batched with anything.
    assert answers[0::2] == answers[1::2]
    served.wait_until_idle()


def _check_calls(calls, names) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}], ids=str
)
def test_required_and_named_tool_choices_always_give_valid_calls(served, choice):
    client = _client(served)
    names = ["set_alarm"] if isinstance(choice, dict) else list(SCHEMAS)
    for seed in range(4):
        kwargs = {"tools": TOOLS, "tool_choice": choice, "temperature": 1.0, "seed": seed}
        reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=200, **kwargs)
        assert reply.choices[0].finish_reason == "tool_calls"
        _check_calls(reply.choices[0].message.tool_calls, names)
        stream = client.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=200, stream=True, **kwargs
        )
        chunks = [c for c in stream if c.choices]
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        streamed = reply.choices[0].message.tool_calls
        assert [(d.function.name, d.function.arguments) for d in deltas] == [
            (c.function.name, c.function.arguments) for c in streamed
        ]


def test_an_agent_loop_calls_a_tool_then_answers_from_its_result(served):
    client = _client(served)
    messages = list(ASK)
    first = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'})
    second = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=12, temperature=0
    )
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    # Turn two starts with turn one's prompt (the tool list first): served from the cache.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 2
    messages.append(answer.message.model_dump(exclude_none=True))
    messages.append({"role": "user", "content": "Thanks. And an alarm?"})
    third = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=200
    )
    _check_calls(third.choices[0].message.tool_calls, list(SCHEMAS))
    assert third.usage.prompt_tokens_details.cached_tokens > second.usage.prompt_tokens // 2


def test_constrained_answers_are_identical_from_the_cache(served):
    client = _client(served)
    kwargs = {"tools": TOOLS, "tool_choice": "required", "temperature": 1.0, "seed": 5}
    messages = [{"role": "user", "content": "Cache me " * 40}]
    first, second = (
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=200, **kwargs)
        for _ in range(2)
    )
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    calls = [
        [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
        for r in (first, second)
    ]
    assert calls[0] == calls[1]


def test_completions_take_response_format_and_guided_extensions(served):
    client = _client(served)

    def complete(**extra):
        reply = client.completions.create(model="tiny", prompt="Pick:", max_tokens=60, **extra)
        return reply.choices[0].text

    assert complete(extra_body={"guided_choice": ["north", "south"]}) in ("north", "south")
    code = complete(extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
    assert len(code) == 6 and code[:2].isupper() and code[3:].isdigit()
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}
    text = complete(extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(text), schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    jsonschema.validate(json.loads(complete(extra_body={"response_format": fmt})), schema)


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "frob"}},
                }
            },
            "invalid_grammar",
            'Unsupported type "frob"',
        ),
        ({"guided_regex": "[a-"}, "invalid_grammar", "regular expression"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "conflicting_constraints", "at most one"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "invalid_tools",
            "'nope'",
        ),
        ({"tool_choice": "required"}, "invalid_tools", "needs tools"),
    ],
)
def test_bad_constraints_are_clear_400s_that_leave_no_state(served, body, code, words):
    payload = {"model": "tiny", "messages": ASK, "max_tokens": 5, **body}
    with httpx.Client(trust_env=False, timeout=60) as http:
        reply = http.post(f"{served.api_url}/chat/completions", json=payload)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == code and words in error["message"]
    assert served.wait_until_idle()["running"] == 0


def test_tools_on_a_template_without_a_call_format_are_refused(tiny_llama):
    with running_server(str(tiny_llama)) as server:
        with pytest.raises(openai.BadRequestError) as refused:
            _client(server).chat.completions.create(
                model="tiny", messages=ASK, tools=TOOLS, max_tokens=5
            )
        assert refused.value.code == "tools_not_supported"
        none = _client(server).chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=5
        )
        assert none.choices[0].message.tool_calls is None


RESPONSE_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def test_an_agent_loop_through_the_responses_api(served):
    client = _client(served)
    first = client.responses.create(
        model="tiny", input="Weather, please.", tools=RESPONSE_TOOLS, tool_choice="required",
        max_output_tokens=200,
    )  # fmt: skip
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name in SCHEMAS
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}
    second = client.responses.create(
        model="tiny", previous_response_id=first.id, input=[result], tools=RESPONSE_TOOLS,
        tool_choice="none", max_output_tokens=10,
    )  # fmt: skip
    assert second.output_text and not [i for i in second.output if i.type == "function_call"]
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 2
    third = client.responses.create(
        model="tiny", previous_response_id=second.id, input="Now set an alarm.",
        tools=RESPONSE_TOOLS, tool_choice={"type": "function", "name": "set_alarm"},
        max_output_tokens=200,
    )  # fmt: skip
    alarm = [item for item in third.output if item.type == "function_call"]
    assert [a.name for a in alarm] == ["set_alarm"]
    jsonschema.validate(json.loads(alarm[0].arguments), SCHEMAS["set_alarm"])
    assert third.usage.input_tokens_details.cached_tokens > second.usage.input_tokens // 2
    stored = client.responses.retrieve(first.id)
    assert [(i.type, getattr(i, "call_id", None)) for i in stored.output] == [
        (i.type, getattr(i, "call_id", None)) for i in first.output
    ]


def test_responses_text_format_json_schema_validates_streamed_and_not(served):
    client = _client(served)
    schema = random_schema(random.Random(99))
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": schema}}
    kwargs = {"model": "tiny", "input": "Data:", "text": fmt, "max_output_tokens": 300}
    reply = client.responses.create(temperature=0, **kwargs)
    jsonschema.validate(json.loads(reply.output_text), schema)
    events = list(client.responses.create(temperature=0, stream=True, **kwargs))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == reply.output_text
