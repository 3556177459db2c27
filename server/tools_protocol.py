"""Structured-output and function-tool fields of the OpenAI bodies, as msgspec Structs.

``response_format`` and ``tools``/``tool_choice`` follow OpenAI's chat completions;
``guided_json``, ``guided_regex``, ``guided_choice`` and ``guided_grammar`` are vLLM's
extensions, named as vLLM names them so that clients written for it carry over.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

FunctionName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class JsonSchemaFormat(Struct, kw_only=True):
    """``response_format.json_schema``: the schema the reply must validate against."""

    name: str = "response"
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    """``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(Struct, kw_only=True):
    """One function a model may call; ``parameters`` is a JSON schema of its arguments."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(Struct, kw_only=True):
    """A tool in ``tools``: a function."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Struct, kw_only=True):
    """The function a named ``tool_choice`` forces."""

    name: FunctionName


class NamedToolChoice(Struct, kw_only=True):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(Struct, kw_only=True):
    """A call's function: its name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(Struct, kw_only=True):
    """One tool call of an assistant message (in replies, and in later requests)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(Struct, kw_only=True, omit_defaults=True):
    """What one streamed chunk adds to a call's function."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """What one streamed chunk adds to the ``index``-th tool call."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta | None = None


class GuidedFields(Struct, kw_only=True):
    """Output constraints shared by chat and text completions (at most one of them)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    """Extension (vLLM): the output validates against this JSON schema."""
    guided_regex: str | None = None
    """Extension (vLLM): the output matches this regular expression."""
    guided_choice: (
        Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] | None
    ) = None
    """Extension (vLLM): the output is exactly one of these strings."""
    guided_grammar: str | None = None
    """Extension (vLLM): the output is in this EBNF grammar's language (start ``root``)."""
