"""From a request's ``response_format``, ``guided_*`` and ``tools`` fields to what the
engine runs: one output constraint, the tools the template renders, the reply parser.

Every mistake is a 400 naming its field, raised before any engine state changes (a
constraint the grammar library cannot compile is one too: ``server.prepare`` compiles
it while validating).
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from prefixcache.client import InputProcessor, StructuredOutput, ToolCallParser
from server.errors import APIError

# The 400 codes of refusals a JSON schema of the request cannot express (the OpenAPI
# document lists them).
INVALID_GRAMMAR = "invalid_grammar"  # a constraint that is not valid or cannot compile
CONFLICTING = "conflicting_constraints"  # more than one output constraint
TOOLS_NOT_SUPPORTED = "tools_not_supported"  # the template writes no tool calls
INVALID_TOOLS = "invalid_tools"  # tool_choice without tools or naming none of them


class ToolSetup(NamedTuple):
    """What a chat request's tools come to."""

    tools: list[dict] | None  # OpenAI function definitions for the chat template
    parser: type[ToolCallParser] | None  # parses the reply into calls (None: no parsing)
    constraint: StructuredOutput | None  # forces a valid call (required / named choice)


def guided_constraint(req) -> tuple[StructuredOutput, str] | None:
    """The output constraint a request asks for, with the field naming it; at most one
    of ``response_format`` (other than text) and the ``guided_*`` extensions."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        found.append(("response_format", lambda: _format_constraint(fmt)))
    if req.guided_json is not None:
        found.append(("guided_json", lambda: StructuredOutput.json_schema(req.guided_json)))
    if req.guided_regex is not None:
        found.append(("guided_regex", lambda: StructuredOutput.regex(req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", lambda: StructuredOutput.choice(req.guided_choice)))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", lambda: StructuredOutput.grammar(req.guided_grammar)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError.bad_request(
            f"give at most one output constraint, got {names}", found[1][0], CONFLICTING
        )
    param, make = found[0]
    try:
        return make(), param
    except ValueError as exc:
        raise APIError.bad_request(str(exc), param, INVALID_GRAMMAR) from None


def _format_constraint(fmt) -> StructuredOutput:
    if fmt.type == "json_object":
        return StructuredOutput.json_object()
    if fmt.json_schema is None or fmt.json_schema.schema is None:
        raise ValueError("response_format json_schema needs json_schema.schema")
    return StructuredOutput.json_schema(fmt.json_schema.schema)


def chat_tools(req, inputs: InputProcessor) -> ToolSetup:
    """The tools of a chat request and what ``tool_choice`` makes of them."""
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if not isinstance(choice, str):
        choice = choice.function.name
    functions = [tool.function for tool in req.tools] if req.tools else None
    return tool_setup(functions, choice, inputs)


def tool_setup(functions: list | None, choice: str, inputs: InputProcessor) -> ToolSetup:
    """What function tools come to: ``choice`` is ``none``, ``auto``, ``required`` or
    the name of the function to call."""
    if not functions:
        if choice not in ("none", "auto"):
            raise APIError.bad_request("tool_choice needs tools", "tool_choice", INVALID_TOOLS)
        return ToolSetup(None, None, None)
    tools = [_definition(function) for function in functions]
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise APIError.bad_request(
            "every tool needs a different function name", "tools", INVALID_TOOLS
        )
    if choice == "none":
        return ToolSetup(tools, None, None)
    parser = inputs.tool_parser
    if parser is None:
        raise APIError.bad_request(
            "this model's chat template writes no tool calls (a Hermes <tool_call> or "
            'Llama 3 JSON format); send tool_choice "none" or no tools',
            "tools",
            TOOLS_NOT_SUPPORTED,
        )
    if choice == "auto":
        return ToolSetup(tools, parser, None)
    name = None if choice == "required" else choice
    if name is not None and name not in names:
        raise APIError.bad_request(
            f"tool_choice names {name!r}, which is not in tools", "tool_choice", INVALID_TOOLS
        )
    try:
        return ToolSetup(tools, parser, parser.constraint(tools, name))
    except ValueError as exc:
        raise APIError.bad_request(str(exc), "tools", INVALID_GRAMMAR) from None


def _definition(function) -> dict:
    """A function tool as the plain dict a chat template takes, unset fields left out."""
    fields = ("name", "description", "parameters", "strict")
    found = {k: msgspec.to_builtins(getattr(function, k)) for k in fields}
    return {"type": "function", "function": {k: v for k, v in found.items() if v is not None}}
