"""OpenAI request and response bodies as msgspec Structs.

Requests are decoded straight from the raw body with ``msgspec.json.decode``; the
type annotations (with their ``Meta`` bounds) are the first line of validation, so a
wrong type or an out-of-range number is a 400 that names the field. Unknown fields
are ignored, as OpenAI clients send many optional ones this server does not use.
Bounds keep every value inside what the engine can take (finite floats, 64-bit
seeds), so no input can reach the engine thread in a shape that would break it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct
from starlette.responses import Response

from server.tools_protocol import ChatTool, GuidedFields, ToolCall, ToolCallDelta, ToolChoice

Role = Literal["system", "user", "assistant", "tool", "developer"]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1, le=2**31 - 1)]
MaxTokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
# int64: within what torch.Generator.manual_seed accepts.
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
# The decoder takes any int64 (the vocabulary check then names the id out of range);
# the document bounds it by the served vocabulary (``server.openapi`` fills that in).
TokenId = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1, extra_json_schema={"x-token-id": True})]
# "" means no stop string (as OpenAI takes it); inside a list each must be non-empty.
Stop = str | list[Annotated[str, Meta(min_length=1)]]


class StreamOptions(Struct, kw_only=True):
    """``include_usage``: send a last chunk carrying the usage (with cached tokens)."""

    include_usage: bool = False


class TextPart(Struct, kw_only=True):
    """One part of a message's content; only ``type == "text"`` is supported."""

    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    """One message of a conversation: an assistant's may carry ``tool_calls`` instead of
    content, a ``tool`` message answers the call ``tool_call_id``."""

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class _SamplingFields(GuidedFields, kw_only=True):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    cache_salt: str | None = None
    """Extra prefix-cache isolation on top of the caller's API key (vLLM's field)."""
    top_k: TopK | None = None
    """Extension: keep only the ``top_k`` most likely tokens (0 or -1: off)."""
    ignore_eos: bool = False
    """Extension: keep generating past end-of-sequence tokens."""


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    """Accepted and unused while ``logprobs`` is false (the only value served)."""
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/completions``: ``prompt`` is text or token ids (one prompt)."""

    prompt: str | list[str | TokenId | list[TokenId]]
    echo: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    suffix: str | None = None


# ------------------------------------------------------------------ responses


class PromptTokensDetails(Struct, kw_only=True):
    """How many prompt tokens were served from the prefix cache."""

    cached_tokens: int


class Timings(Struct, kw_only=True):
    """Server-side milliseconds of one request, stage by stage (a prefixcache extension)."""

    request_decode_ms: float  # reading and decoding the body, auth
    tokenize_ms: float  # chat template and tokenization
    queue_ms: float  # waiting for admission
    lookup_ms: float  # prefix-cache hashing, walk and locking
    prefill_ms: float  # admission to first token: the uncached tail's prefill
    ttft_ms: float  # arrival to first token, all of the above included
    total_ms: float


class Usage(Struct, kw_only=True):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    timings: Timings | None = None


class AssistantMessage(Struct, kw_only=True):
    """The reply of a non-streaming chat completion (``content`` null when it is only
    tool calls)."""

    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Struct, kw_only=True):
    """One choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(Struct, kw_only=True):
    """Response of a non-streaming chat completion."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(Struct, kw_only=True, omit_defaults=True):
    """What one streamed chunk adds to the reply."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Struct, kw_only=True):
    """One choice of a streamed chat chunk."""

    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One server-sent event of a streaming chat completion."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(Struct, kw_only=True):
    """One choice of a text completion (or of one streamed chunk)."""

    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(Struct, kw_only=True):
    """Response of a text completion, and each streamed chunk of one (usage then null)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(Struct, kw_only=True):
    """One served model."""

    id: str
    object: str = "model"
    created: int
    owned_by: str = "prefixcache"
    max_model_len: int


class ModelList(Struct, kw_only=True):
    """``GET /v1/models``."""

    object: str = "list"
    data: list[ModelCard]


class ErrorBody(Struct, kw_only=True):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct, kw_only=True):
    """Every 4xx/5xx body: ``{"error": {...}}``."""

    error: ErrorBody


_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "x-token-id": True}, "minItems": 1}
_ONLY_ONE = {"type": "integer", "minimum": 1, "maximum": 1, "default": 1}
# Where the server serves less than its decoder takes, the document shows what is
# served: the decoder accepts the wider values so that the 400 can say what is not
# supported. ``server.openapi`` merges these into the Structs' schemas.
DOCUMENTED = {
    # content is required but for an assistant message that makes tool calls
    "ChatMessage": {
        "anyOf": [
            {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
            {
                "required": ["tool_calls"],
                "properties": {
                    "role": {"const": "assistant"},
                    "tool_calls": {"type": "array", "minItems": 1},
                },
            },
        ]
    },
    "TextPart": {
        "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
        "required": ["type", "text"],
    },
    "ChatCompletionRequest": {
        "properties": {"n": _ONLY_ONE, "logprobs": {"const": False, "default": False}}
    },
    "CompletionRequest": {
        "properties": {
            "n": _ONLY_ONE,
            # one prompt: text, token ids, or a list holding exactly one of those
            "prompt": {
                "anyOf": [
                    _TEXT,
                    _TOKEN_IDS,
                    {
                        "type": "array",
                        "items": {"anyOf": [_TEXT, _TOKEN_IDS]},
                        "minItems": 1,
                        "maxItems": 1,
                    },
                ]
            },
            "echo": {"const": False, "default": False},
            "logprobs": {"anyOf": [{"const": 0}, {"type": "null"}], "default": None},
            "suffix": {"anyOf": [{"const": ""}, {"type": "null"}], "default": None},
        }
    },
}

REQUEST_TYPES = (ChatCompletionRequest, CompletionRequest)
RESPONSE_TYPES = (ChatCompletion, ChatCompletionChunk, Completion, ModelList, ErrorResponse)

encode = msgspec.json.Encoder().encode


def json_response(body, headers: dict[str, str] | None = None) -> Response:
    """``body`` (a Struct) as an ``application/json`` response."""
    return Response(encode(body), media_type="application/json", headers=headers)
