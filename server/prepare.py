"""From a raw request body to what the engine runs: prompt ids, sampling params, salt.

Everything a client can get wrong is found here, before any engine state changes,
and raised as a 400 (or 404 for an unknown model) whose message names the problem.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import msgspec
import numpy as np
from starlette.requests import ClientDisconnect, Request

from prefixcache.client import PromptTooLong, SamplingParams, StructuredOutput, ToolCallParser
from server.auth import tenant_salt
from server.chat_protocol import ChatCompletionRequest, CompletionRequest, TextPart
from server.errors import APIError, engine_error
from server.state import ServerState
from server.structured import CONFLICTING, INVALID_GRAMMAR, ToolSetup, chat_tools, guided_constraint

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class Prepared(NamedTuple):
    """A validated request, ready for ``EngineClient.generate``."""

    request_id: str
    prompt_ids: np.ndarray  # validated: in the vocabulary, and fits with max_tokens
    params: SamplingParams
    salt: str | None
    stream: bool
    include_usage: bool
    arrival: float
    decode_s: float = 0.0  # arrival -> validated body
    tokenize_s: float = 0.0
    tool_parser: type[ToolCallParser] | None = None  # parses tool calls out of the reply


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body; 413 once it grows past ``limit`` bytes, 408 when it has
    not all arrived within the server's ``request_timeout`` (a stalled client would
    otherwise hold its connection and memory forever)."""
    timeout = request.app.state.server.request_timeout
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body was not received within {timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over {limit} bytes", code="too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body") from None
    return b"".join(chunks)


def decode(body: bytes, kind: type[T]) -> T:
    """Decode ``body`` as a ``kind`` Struct; any failure is a 400 naming the field.

    A whole number written as a float (``20.0``) is an integer in JSON Schema, so it is
    taken where an integer is expected (msgspec alone refuses it).
    """
    if not body.strip():
        raise APIError.bad_request("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        if "got `float`" not in str(exc):
            raise APIError.from_decode_error(exc) from None
        error = exc
    except (msgspec.MsgspecError, ValueError, RecursionError) as exc:
        raise APIError.from_decode_error(exc) from None
    try:  # the slow path, only for bodies with a float where an int belongs
        return msgspec.convert(_whole_floats_as_ints(msgspec.json.decode(body)), kind)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        raise APIError.from_decode_error(error) from None


def _whole_floats_as_ints(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    return value


def check_model(state: ServerState, model: str | None) -> None:
    """A 404 unless ``model`` (when given) is the one this server serves."""
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def check_request(state: ServerState, req: ChatCompletionRequest | CompletionRequest) -> None:
    """The checks that need no tokenizing: a 404 for another model, a 400 for n > 1."""
    check_model(state, req.model)
    if req.n != 1:
        raise APIError.bad_request("only n=1 is supported", param="n")


async def prepare_chat(
    state: ServerState, req: ChatCompletionRequest, tenant: bytes | None, arrival: float
) -> Prepared:
    """Validate a chat request and render its messages to prompt ids."""
    check_request(state, req)
    if req.logprobs:  # top_logprobs alone asks for nothing while logprobs is off
        raise APIError.bad_request("logprobs are not supported", param="logprobs")
    messages = [message_dict(i, m) for i, m in enumerate(req.messages)]
    inputs = state.client.inputs
    decoded = time.perf_counter()
    setup = chat_tools(req, inputs)
    structured = await _constraint(state, req, setup)
    prompt_ids = await run_tokenizer(
        state, lambda: inputs.chat_tokens(messages, tools=setup.tools), "messages"
    )
    max_tokens = req.max_completion_tokens or req.max_tokens
    prepared = _prepared(
        state, req, "chatcmpl", prompt_ids, max_tokens, tenant, arrival, structured
    )
    return _with_timings(prepared._replace(tool_parser=setup.parser), decoded)


async def _constraint(
    state: ServerState, req, setup: ToolSetup | None = None
) -> StructuredOutput | None:
    """The request's one output constraint, compiled (a 400 when it cannot be)."""
    guided = guided_constraint(req)
    if setup is not None and setup.constraint is not None:
        if guided is not None:
            raise APIError.bad_request(
                f"{guided[1]} cannot be combined with a required or named tool_choice",
                guided[1],
                CONFLICTING,
            )
        guided = (setup.constraint, "tools")
    if guided is None:
        return None
    return await compile_constraint(state, *guided)


async def compile_constraint(state: ServerState, spec: StructuredOutput, param: str):
    """Compile ``spec`` for the engine (cached there); a 400 ``invalid_grammar`` naming
    ``param`` and the construct when it cannot be."""
    loop = asyncio.get_running_loop()
    try:  # compiling is C++ work: off the event loop, like tokenizing
        await loop.run_in_executor(state.tokenizer_pool, state.client.inputs.check_structured, spec)
    except ValueError as exc:
        raise APIError.bad_request(str(exc), param, INVALID_GRAMMAR) from None
    return spec


async def prepare_completion(
    state: ServerState, req: CompletionRequest, tenant: bytes | None, arrival: float
) -> Prepared:
    """Validate a text completion request and tokenize its prompt."""
    check_request(state, req)
    if req.echo:
        raise APIError.bad_request("echo is not supported", param="echo")
    if req.logprobs:
        raise APIError.bad_request("logprobs are not supported", param="logprobs")
    if req.suffix:
        raise APIError.bad_request("suffix is not supported", param="suffix")
    prompt = _single_prompt(req.prompt)
    inputs = state.client.inputs
    decoded = time.perf_counter()
    structured = await _constraint(state, req)
    prompt_ids = await run_tokenizer(state, lambda: inputs.prompt_tokens(prompt), "prompt")
    max_tokens = req.max_tokens
    if max_tokens is None:
        room = state.max_context_tokens - len(prompt_ids)
        max_tokens = min(_DEFAULT_COMPLETION_TOKENS, room) if room > 0 else 1
    prepared = _prepared(state, req, "cmpl", prompt_ids, max_tokens, tenant, arrival, structured)
    return _with_timings(prepared, decoded)


def _prepared(
    state: ServerState,
    req: ChatCompletionRequest | CompletionRequest,
    prefix: str,
    prompt_ids: np.ndarray | list[int],
    max_tokens: int | None,
    tenant: bytes | None,
    arrival: float,
    structured: StructuredOutput | None = None,
) -> Prepared:
    """Sampling params checked against the context limit, plus the request's identity."""
    if max_tokens is None:  # OpenAI's chat default: whatever room the context leaves
        max_tokens = state.max_context_tokens - len(prompt_ids)
        if max_tokens < 1:
            raise APIError.bad_request(
                f"the prompt ({len(prompt_ids)} tokens) leaves no room for output within "
                f"the context limit ({state.max_context_tokens} tokens)",
                code="context_length_exceeded",
            )
    params = _sampling_params(req, max_tokens, structured)
    check_fits(state, len(prompt_ids), params.max_tokens)
    return Prepared(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        prompt_ids=prompt_ids,
        params=params,
        salt=tenant_salt(tenant, req.cache_salt),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        arrival=arrival,
    )


def check_fits(state: ServerState, num_prompt_tokens: int, max_tokens: int) -> None:
    """A 400 ``context_length_exceeded`` unless the prompt and its output fit the engine."""
    try:
        state.client.inputs.check_fits(num_prompt_tokens, max_tokens)
    except ValueError as exc:
        raise APIError.bad_request(str(exc), code="context_length_exceeded") from None


def _sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=req.seed,
            stop=req.stop or None,
            ignore_eos=req.ignore_eos,
            structured=structured,
        )
    except ValueError as exc:
        raise APIError.bad_request(str(exc)) from None


def message_dict(index: int, message) -> dict:
    """A request message as the plain dict the chat template takes (text parts joined;
    an assistant's tool calls and a tool result's call id kept)."""
    content = message.content
    calls = getattr(message, "tool_calls", None)
    if content is None:
        if not (message.role == "assistant" and calls):
            raise APIError.bad_request(
                f"message {index} has no content (only an assistant message that makes "
                "tool_calls may leave it out)",
                param=f"messages[{index}]",
            )
        content = ""
    elif not isinstance(content, str):
        content = "".join(_part_text(index, part) for part in content)
    found = {"role": message.role, "content": content}
    if calls:
        found["tool_calls"] = [msgspec.to_builtins(call) for call in calls]
    if getattr(message, "tool_call_id", None) is not None:
        found["tool_call_id"] = message.tool_call_id
    return found


def _part_text(index: int, part: TextPart) -> str:
    if part.type != "text" or part.text is None:
        raise APIError.bad_request(
            f"message {index}: only text content parts are supported, got type {part.type!r}",
            param=f"messages[{index}].content",
        )
    return part.text


def _with_timings(prepared: Prepared, decoded: float) -> Prepared:
    return prepared._replace(
        decode_s=decoded - prepared.arrival, tokenize_s=time.perf_counter() - decoded
    )


def _single_prompt(prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise APIError.bad_request("prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return prompt
    if len(prompt) == 1:
        return prompt[0]
    raise APIError.bad_request(
        "prompt must be a string, a list of token ids, or a list holding one of those "
        "(one prompt per request)",
        param="prompt",
    )


async def run_tokenizer(state: ServerState, fn: Callable[[], T], param: str) -> T:
    """Run ``fn`` (tokenizing, rendering) on a tokenizer thread, off the event loop.

    A failure there is the input's fault: a 400 naming ``param``
    (``context_length_exceeded`` for a prompt past the context limit).
    """
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(state.tokenizer_pool, fn)
    except PromptTooLong as exc:
        raise APIError.bad_request(str(exc), param, code="context_length_exceeded") from None
    except ValueError as exc:
        raise engine_error(exc, param) from None
    except Exception as exc:  # e.g. a chat template's raise_exception(): still the input's
        logger.info("tokenizing %s failed: %r", param, exc)
        raise APIError.bad_request(f"cannot tokenize {param}: {exc}", param=param) from None
