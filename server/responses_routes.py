"""OpenAI's Responses API: conversations kept on the server, continued by id.

``POST /v1/responses`` with ``previous_response_id`` sends only the new message: the
stored conversation's token ids are reused and only the new text is tokenized (see
``prefixcache.apps.conversations``), then the prefix cache skips the history's prefill.
Stored responses are scoped per API key: another key's id answers 404 like an
unknown one.

When storing fails after the reply was generated (the store's disk is full), the
reply is not lost: a non-streamed request gets a 507 (full disk; 500 for another
write error) whose body is an OpenAI error, code ``response_not_stored``, plus the
generated ``response`` with ``store: false``; a stream sends its output as usual,
then an ``error`` event with that code instead of ``response.completed``. Either way
nothing is stored, so ``GET /v1/responses/{id}`` answers 404.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import Response

from prefixcache.client import (
    ConversationRenderer,
    ParsedReply,
    ResponseNotStored,
    ResponseStore,
    SamplingParams,
    StoredResponse,
    StructuredOutput,
    Turn,
    new_response_id,
    stored_response,
)
from server.auth import authenticate, tenant_salt
from server.chat_protocol import ErrorBody, encode, json_response
from server.errors import APIError, engine_dead
from server.generation import CLIENT_GONE, Tally, answer, timing_header, tracked
from server.openapi import event_stream, operation
from server.prepare import (
    Prepared,
    check_fits,
    check_model,
    decode,
    read_body,
    run_tokenizer,
)
from server.responses_format import (
    NOT_STORED,
    assistant_message,
    job_response,
    response_events,
    stored_response_object,
)
from server.responses_inputs import input_messages, request_constraint, request_tools
from server.responses_protocol import (
    RESPONSES_TYPES,
    ResponseDeleted,
    ResponseErrorDetail,
    ResponseErrorEvent,
    ResponseEvent,
    ResponseNotStoredError,
    ResponseObject,
    ResponseRequest,
)
from server.state import ServerState
from server.streaming import SHUTDOWN_MESSAGE, SSEResponse

__all__ = ["RESPONSES_TYPES", "install_response_store", "router"]

router = APIRouter()
_NOT_FOUND_DOC = "No such stored response for this API key"


@dataclass(slots=True)
class Job:
    """A validated ``POST /v1/responses``: the engine request and how to store it."""

    prepared: Prepared
    turn: Turn
    req: ResponseRequest
    scope: str
    created_at: int
    renderer: ConversationRenderer
    store: ResponseStore
    model: str
    store_s: float = 0.0  # the previous_response_id lookup; part of prepared.tokenize_s
    not_stored: ResponseNotStored | None = None  # why saving failed, if it did
    parsed: ParsedReply | None = None  # the reply's text and tool calls, once parsed

    def reply(self, tally: Tally) -> ParsedReply:
        """The finished reply as text and tool calls (parsed once: calls get ids)."""
        if self.parsed is None:
            parser = self.prepared.tool_parser
            self.parsed = parser().parse(tally.text) if parser else ParsedReply(tally.text, [])
        return self.parsed

    async def save(self, state: ServerState, tally: Tally) -> None:
        """Store the finished turn (when ``store``) so a later turn can continue it.

        A failed write is kept in ``not_stored`` (nothing is stored then).
        """
        if not self.req.store or tally.finish_reason in (None, "abort"):
            return
        counts = (tally.num_prompt_tokens, tally.num_cached_tokens, tally.num_output_tokens)
        message = assistant_message(self.reply(tally))

        def build() -> StoredResponse:
            entry = stored_response(
                self.renderer, self.turn, self.prepared.request_id, self.scope,
                tally.text, counts, tally.finish_reason, message,
            )  # fmt: skip
            entry.created_at = self.created_at
            return entry

        def put() -> ResponseNotStored | None:
            try:
                self.store.put(build())
            except ResponseNotStored as exc:
                return exc
            return None

        # A file write when the store has a folder: off the event loop.
        self.not_stored = await run_tokenizer(state, put, "input")


def install_response_store(app: FastAPI, store: ResponseStore) -> None:
    """Serve ``app``'s Responses API from ``store`` (else a default one is made)."""
    app.state.server.responses = store


def _shutdown_tail() -> bytes:
    """The ``error`` event that ends a response stream cut by a shutdown."""
    event = ResponseErrorEvent(
        type="error",
        code="server_shutdown",
        message=SHUTDOWN_MESSAGE,
        param=None,
        sequence_number=0,  # out of band: sent in place of the stream's remaining events
        error=ResponseErrorDetail(code="server_shutdown", message=SHUTDOWN_MESSAGE),
    )
    return b"event: error\ndata: " + encode(event) + b"\n\n"


def _scope(tenant: bytes | None) -> str:
    return tenant.hex() if tenant else ""


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(
        404, f"no response with id {response_id!r} found", param=param, code="not_found"
    )


def _with_not_stored(extra: dict) -> dict:
    schema = {"$ref": f"#/components/schemas/{ResponseNotStoredError.__name__}"}
    for status, when in (("507", "the disk is full"), ("500", "another write error")):
        extra["responses"][status] = {
            "description": f"Generated, but not stored: {when}",
            "content": {"application/json": {"schema": schema}},
        }
    return extra


# ------------------------------------------------------------------- routes


@router.post(
    "/v1/responses",
    summary="Create a response, optionally continuing a stored one",
    openapi_extra=_with_not_stored(
        operation(
            ResponseObject,
            ResponseRequest,
            event_stream(
                [ResponseEvent, ResponseErrorEvent],
                False,
                "with stream=true: `event: <type>` and `data: <ResponseEvent>` per event, "
                "ending with `response.completed`, or an `error` event",
            ),
        )
    ),
)
async def create_response(
    request: Request, tenant: bytes | None = Depends(authenticate)
) -> Response:
    """Reply to ``input`` after ``previous_response_id``; ``stream: true`` sends events."""
    state, arrival = request.app.state.server, time.perf_counter()
    req = decode(await read_body(request, state.max_body_bytes), ResponseRequest)
    ticket = state.admission.acquire()
    try:
        job = await _prepare(request, state, req, tenant, arrival)
        if not state.client.is_alive:
            raise engine_dead()
        if req.stream:
            body = response_events(job, tracked(state, job.prepared), lambda t: job.save(state, t))
            response = SSEResponse(
                body, on_close=ticket.release, cut=state.drain.cut, tail=_shutdown_tail()
            )
            ticket = None  # the stream gives its place back when it ends
            return response
        return await _finish(request, state, job)
    finally:
        if ticket is not None:
            ticket.release()


@router.get(
    "/v1/responses/{response_id}",
    summary="Retrieve a stored response",
    openapi_extra=operation(ResponseObject, not_found=_NOT_FOUND_DOC),
)
async def get_response(
    response_id: str, request: Request, tenant: bytes | None = Depends(authenticate)
) -> Response:
    """A stored response; 404 when unknown, deleted, expired or another key's."""
    state = request.app.state.server
    entry = state.response_store.get(response_id, _scope(tenant))
    if entry is None:
        raise _not_found(response_id)
    return json_response(stored_response_object(entry, state.model_name))


@router.delete(
    "/v1/responses/{response_id}",
    summary="Delete a stored response",
    openapi_extra=operation(ResponseDeleted, not_found=_NOT_FOUND_DOC),
)
async def delete_response(
    response_id: str, request: Request, tenant: bytes | None = Depends(authenticate)
) -> Response:
    """Forget a stored response; 404 when ``GET`` would not find it."""
    if not request.app.state.server.response_store.delete(response_id, _scope(tenant)):
        raise _not_found(response_id)
    return json_response(ResponseDeleted(id=response_id))


# -------------------------------------------------------------- preparation


async def _prepare(
    request: Request,
    state: ServerState,
    req: ResponseRequest,
    tenant: bytes | None,
    arrival: float,
) -> Job:
    decoded = time.perf_counter()
    check_model(state, req.model)
    store, renderer, scope = state.response_store, state.renderer, _scope(tenant)
    previous = _previous(store, req.previous_response_id, scope)
    looked_up = time.perf_counter()
    new = input_messages(req.input)
    setup = request_tools(state, req)
    structured = await request_constraint(state, req, setup)
    limit = state.client.inputs.max_prompt_tokens
    turn = await run_tokenizer(
        state,
        lambda: renderer.turn(new, previous, req.instructions, limit, setup.tools),
        "input",
    )
    params = _sampling_params(state, req, len(turn.prompt_ids), structured)
    prepared = Prepared(
        request_id=new_response_id(),
        prompt_ids=turn.prompt_ids,
        params=params,
        salt=tenant_salt(tenant, None),
        stream=req.stream,
        include_usage=False,
        arrival=arrival,
        decode_s=decoded - arrival,
        tokenize_s=time.perf_counter() - decoded,  # store lookup, rendering, tokenizing
        tool_parser=setup.parser,
    )
    created = int(store.clock())  # the store's clock: expiry is measured from it
    return Job(
        prepared, turn, req, scope, created, renderer, store, state.model_name,
        store_s=looked_up - decoded,
    )  # fmt: skip


def _previous(store: ResponseStore, response_id: str | None, scope: str) -> StoredResponse | None:
    """The stored response a turn continues (None: a new conversation); 404 if not found."""
    if response_id is None:
        return None
    previous = store.get(response_id, scope)
    if previous is None:
        raise _not_found(response_id, "previous_response_id")
    return previous


def _sampling_params(
    state: ServerState,
    req: ResponseRequest,
    num_prompt: int,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    max_tokens = req.max_output_tokens
    if max_tokens is None:  # whatever room the context leaves
        max_tokens = state.max_context_tokens - num_prompt
    if max_tokens < 1:
        raise APIError.bad_request(
            f"the conversation ({num_prompt} tokens) leaves no room for output within the "
            f"context limit ({state.max_context_tokens} tokens)",
            code="context_length_exceeded",
        )
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            structured=structured,
        )
    except ValueError as exc:
        raise APIError.bad_request(str(exc)) from None
    check_fits(state, num_prompt, params.max_tokens)
    return params


# ---------------------------------------------------------------- collecting


async def _finish(request: Request, state: ServerState, job: Job) -> Response:
    tally = await answer(request, state, job.prepared)
    if tally is None:
        return Response(status_code=CLIENT_GONE)
    await job.save(state, tally)
    if job.not_stored is not None:
        return _not_stored_response(state, job, tally)
    return json_response(job_response(job, tally), timing_header(request, tally))


def _not_stored_response(state: ServerState, job: Job, tally: Tally) -> Response:
    """The generated response, with the store failure as a 507 (disk full) or 500."""
    failure = job.not_stored
    status = 507 if failure.disk_full else 500
    state.metrics.record_error(status)
    error = ErrorBody(message=str(failure), type="server_error", code=NOT_STORED)
    body = ResponseNotStoredError(error=error, response=job_response(job, tally))
    return Response(encode(body), status, media_type="application/json")
