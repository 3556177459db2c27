"""A Responses API request's input items, tools and text format, as the chat template
and the engine take them: messages (function calls and their outputs included), the
tool setup, and the one output constraint."""

from __future__ import annotations

from prefixcache.client import StructuredOutput
from server.errors import APIError
from server.prepare import compile_constraint
from server.responses_protocol import InputMessage, ResponseRequest
from server.state import ServerState
from server.structured import CONFLICTING, INVALID_GRAMMAR, ToolSetup, tool_setup


def request_tools(state: ServerState, req: ResponseRequest) -> ToolSetup:
    """The request's function tools and what its ``tool_choice`` makes of them."""
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    return tool_setup(
        req.tools, choice if isinstance(choice, str) else choice.name, state.client.inputs
    )


async def request_constraint(state: ServerState, req: ResponseRequest, setup: ToolSetup):
    """The one output constraint: ``text.format``, or a required or named tool call."""
    fmt = req.text.format if req.text is not None else None
    spec = None
    if fmt is not None and fmt.type != "text":
        if setup.constraint is not None:
            raise APIError.bad_request(
                "text.format cannot be combined with a required or named tool_choice",
                "text.format",
                CONFLICTING,
            )
        try:
            spec = _format_constraint(fmt)
        except ValueError as exc:
            raise APIError.bad_request(str(exc), "text.format", INVALID_GRAMMAR) from None
        return await compile_constraint(state, spec, "text.format")
    if setup.constraint is not None:
        return await compile_constraint(state, setup.constraint, "tools")
    return None


def _format_constraint(fmt) -> StructuredOutput:
    if fmt.type == "json_object":
        return StructuredOutput.json_object()
    if fmt.schema is None:
        raise ValueError("text.format json_schema needs a schema")
    return StructuredOutput.json_schema(fmt.schema)


def input_messages(value: str | list[InputMessage]) -> list[dict]:
    """A turn's input as chat messages (consecutive function calls in one message)."""
    if isinstance(value, str):
        if not value:
            raise APIError.bad_request("input is empty", param="input")
        return [{"role": "user", "content": value}]
    messages: list[dict] = []
    for i, item in enumerate(value):
        message = _item_message(i, item)
        last = messages[-1] if messages else None
        if "tool_calls" in message and last is not None and "tool_calls" in last:
            last["tool_calls"] += message["tool_calls"]  # parallel calls: one message
        else:
            messages.append(message)
    return messages


def _item_message(index: int, item: InputMessage) -> dict:
    """An input item as a chat message (a function call as an assistant's tool call, its
    output as a ``tool`` message); 400 naming the missing field."""
    need = {
        "message": ("role", "content"),
        "function_call": ("call_id", "name", "arguments"),
        "function_call_output": ("call_id", "output"),
    }[item.type]
    if item.content is not None:  # checked whatever the item type (the document says so)
        text = _content(index, item.content)
    for field in need:
        if getattr(item, field) is None:
            raise APIError.bad_request(
                f"input item {index} ({item.type}) needs {field}", param=f"input[{index}].{field}"
            )
    if item.type == "function_call":
        function = {"name": item.name, "arguments": item.arguments}
        call = {"id": item.call_id, "type": "function", "function": function}
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    if item.type == "function_call_output":
        return {"role": "tool", "content": item.output, "tool_call_id": item.call_id}
    return {"role": item.role, "content": text}


def _content(index: int, content) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise APIError.bad_request(
                f"input item {index}: only text content parts are supported, "
                f"got type {part.type!r}",
                param=f"input[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)
