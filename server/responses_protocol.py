"""OpenAI Responses API bodies (the subset served here) as msgspec Structs.

As in ``server.chat_protocol``, requests are decoded straight from the raw body and the
annotations are the first validation; unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from server.chat_protocol import ErrorBody, MaxTokens, Temperature, Timings, TopP
from server.tools_protocol import FunctionName

InputRole = Literal["user", "system", "developer", "assistant"]
ResponseId = Annotated[str, Meta(pattern=r"^resp_[0-9a-f]{32}$")]


class InputPart(Struct, kw_only=True):
    """One content part of an input message: ``input_text`` (or ``output_text``)."""

    type: str
    text: str | None = None


class InputMessage(Struct, kw_only=True):
    """One input item: a message with a role and text content (``type`` ``message``),
    a function call the model made (``function_call``: ``call_id``, ``name``,
    ``arguments``) or a call's result (``function_call_output``: ``call_id``,
    ``output``)."""

    role: InputRole | None = None
    content: str | list[InputPart] | None = None
    type: Literal["message", "function_call", "function_call_output"] = "message"
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    id: str | None = None


class TextFormat(Struct, kw_only=True):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its ``schema``."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True):
    """``text``: the reply's format."""

    format: TextFormat | None = None


class FunctionTool(Struct, kw_only=True):
    """A function tool of the Responses API (flat: no ``function`` wrapper)."""

    type: Literal["function"] = "function"
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(Struct, kw_only=True):
    """``tool_choice: {"type": "function", "name": ...}``."""

    type: Literal["function"] = "function"
    name: FunctionName


class ResponseRequest(Struct, kw_only=True):
    """``POST /v1/responses``."""

    input: str | Annotated[list[InputMessage], Meta(min_length=1)]
    model: str | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    store: bool = True
    user: str | None = None
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None


class OutputText(Struct, kw_only=True):
    """The reply's text part."""

    type: str = "output_text"
    text: str
    annotations: list[str] = []


class OutputMessage(Struct, kw_only=True, tag_field="type", tag="message"):
    """The assistant message a response produces."""

    id: str
    role: str = "assistant"
    status: str
    content: list[OutputText]


class FunctionCallItem(Struct, kw_only=True, tag_field="type", tag="function_call"):
    """A function call a response produces; answer it with a ``function_call_output``
    input item carrying its ``call_id``."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(Struct, kw_only=True):
    """How many input tokens were served from the prefix cache."""

    cached_tokens: int


class OutputTokensDetails(Struct, kw_only=True):
    """Always zero here; the field is part of OpenAI's usage."""

    reasoning_tokens: int = 0


class ResponseTimings(Timings, kw_only=True):
    """Chat completions' stage timings, with the stored conversation's lookup split out.

    ``tokenize_ms`` is rendering and tokenizing the turn (only the new text, when it
    continues a stored response); ``ttft_ms`` includes ``store_ms``.
    """

    store_ms: float  # finding previous_response_id in the response store


class ResponseUsage(Struct, kw_only=True):
    """Token counts of one response (and, when it ran here, its stage timings)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
    timings: ResponseTimings | None = None


class IncompleteDetails(Struct, kw_only=True):
    """Why a response stopped early (``max_output_tokens``)."""

    reason: str


class ResponseError(Struct, kw_only=True):
    """Why a response failed."""

    code: str
    message: str


class ResponseObject(Struct, kw_only=True):
    """A response: ``POST`` (non-streaming) and ``GET /v1/responses/{id}``."""

    id: str
    object: str = "response"
    created_at: int
    status: str
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    previous_response_id: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    store: bool = True
    user: str | None = None
    metadata: dict[str, str] = {}
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "auto"
    tools: list[str] = []


class ResponseDeleted(Struct, kw_only=True):
    """``DELETE /v1/responses/{id}``."""

    id: str
    object: str = "response"
    deleted: bool = True


class ResponseEvent(Struct, kw_only=True, omit_defaults=True):
    """One server-sent event of a streaming response (fields per ``type``)."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    item_id: str | None = None
    output_index: int | None = None
    content_index: int | None = None
    delta: str | None = None
    text: str | None = None
    item: OutputItem | None = None
    part: OutputText | None = None
    logprobs: list[float] | None = None
    arguments: str | None = None


class ResponseNotStoredError(Struct, kw_only=True):
    """``POST /v1/responses`` when the reply was generated but could not be stored (507
    for a full disk, else 500): an OpenAI error body plus the generated response, whose
    ``store`` is false and whose ``error`` repeats why."""

    error: ErrorBody
    response: ResponseObject


class ResponseErrorDetail(Struct, kw_only=True):
    """The error of an ``error`` event."""

    code: str
    message: str


class ResponseErrorEvent(Struct, kw_only=True):
    """The ``error`` event that ends a response stream whose generation failed."""

    type: Literal["error"]
    code: str
    message: str
    param: str | None
    sequence_number: int
    error: ResponseErrorDetail


# What the server serves, where it is narrower than its decoder (see
# ``server.chat_protocol.DOCUMENTED``).
DOCUMENTED = {
    "InputMessage": {
        "anyOf": [
            {
                "properties": {
                    "type": {"const": "message"},
                    "role": {"enum": ["user", "system", "developer", "assistant"]},
                    "content": {"not": {"type": "null"}},
                },
                "required": ["role", "content"],
            },
            {
                "properties": {
                    "type": {"const": "function_call"},
                    "call_id": {"type": "string"},
                    "name": {"type": "string"},
                    "arguments": {"type": "string"},
                },
                "required": ["type", "call_id", "name", "arguments"],
            },
            {
                "properties": {
                    "type": {"const": "function_call_output"},
                    "call_id": {"type": "string"},
                    "output": {"type": "string"},
                },
                "required": ["type", "call_id", "output"],
            },
        ]
    },
    "InputPart": {
        "properties": {
            "type": {"enum": ["input_text", "output_text", "text"]},
            "text": {"type": "string"},
        },
        "required": ["type", "text"],
    },
    "ResponseRequest": {
        "properties": {
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/InputMessage"},
                        "minItems": 1,
                    },
                ]
            }
        }
    },
}

RESPONSES_TYPES = (
    ResponseRequest,
    ResponseObject,
    ResponseDeleted,
    ResponseEvent,
    ResponseErrorEvent,
    ResponseNotStoredError,
)
