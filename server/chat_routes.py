"""OpenAI's chat completions, completions and models endpoints.

A generation request goes: API key (401) -> body decode (400) -> admission (429) ->
model, prompt and sampling checks (404/400) -> the engine, streamed or collected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from server.auth import authenticate
from server.chat_format import ChatFormat, CompletionFormat
from server.chat_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    json_response,
)
from server.errors import engine_dead
from server.generation import CLIENT_GONE, answer, timing_header, tracked
from server.openapi import event_stream, operation
from server.prepare import Prepared, decode, prepare_chat, prepare_completion, read_body
from server.state import ServerState, Ticket, server_state
from server.streaming import SSEResponse, events, shutdown_tail

logger = logging.getLogger(__name__)

router = APIRouter()
_STREAM_DOC = (
    "with stream=true: one `data:` event per chunk, an error body if generation fails "
    "after the headers were sent, then `data: [DONE]`"
)


@router.post(
    "/v1/chat/completions",
    summary="Create a chat completion",
    openapi_extra=operation(
        ChatCompletion,
        ChatCompletionRequest,
        event_stream([ChatCompletionChunk, ErrorResponse], True, _STREAM_DOC),
    ),
)
async def chat_completions(
    request: Request, tenant: bytes | None = Depends(authenticate)
) -> Response:
    """Reply to a conversation; ``stream: true`` sends server-sent events."""
    state, arrival = server_state(request), time.perf_counter()
    req = decode(await read_body(request, state.max_body_bytes), ChatCompletionRequest)
    return await _generate(
        request, state, lambda: prepare_chat(state, req, tenant, arrival), ChatFormat
    )


@router.post(
    "/v1/completions",
    summary="Create a text completion",
    openapi_extra=operation(
        Completion, CompletionRequest, event_stream([Completion, ErrorResponse], True, _STREAM_DOC)
    ),
)
async def completions(request: Request, tenant: bytes | None = Depends(authenticate)) -> Response:
    """Continue a prompt given as text or token ids; ``stream: true`` sends events."""
    state, arrival = server_state(request), time.perf_counter()
    req = decode(await read_body(request, state.max_body_bytes), CompletionRequest)
    return await _generate(
        request, state, lambda: prepare_completion(state, req, tenant, arrival), CompletionFormat
    )


async def _generate(
    request: Request,
    state: ServerState,
    prepare: Callable[[], Awaitable[Prepared]],
    format_class: type[ChatFormat] | type[CompletionFormat],
) -> Response:
    ticket: Ticket | None = state.admission.acquire()
    try:
        prepared = await prepare()
        if not state.client.is_alive:
            raise engine_dead()
        fmt = format_class(state, prepared)
        if prepared.stream:
            body = events(tracked(state, prepared), fmt, prepared)
            response = SSEResponse(
                body, on_close=ticket.release, cut=state.drain.cut, tail=shutdown_tail()
            )
            ticket = None  # the stream gives its place back when it ends
            return response
        return await _collect(request, state, prepared, fmt)
    finally:
        if ticket is not None:
            ticket.release()


async def _collect(request: Request, state: ServerState, prepared: Prepared, fmt) -> Response:
    tally = await answer(request, state, prepared)
    if tally is None:
        return Response(status_code=CLIENT_GONE)
    return json_response(fmt.response(tally), timing_header(request, tally))


@router.get("/v1/models", summary="List the served model", openapi_extra=operation(ModelList))
async def models(request: Request, tenant: bytes | None = Depends(authenticate)) -> Response:
    """The one model this server serves."""
    state = server_state(request)
    card = ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)
    return json_response(ModelList(data=[card]))
