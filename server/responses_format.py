"""Response objects and the Responses API's server-sent events.

A stream goes ``response.created``, ``response.in_progress``, the output item and
content part being added, one ``response.output_text.delta`` per piece of text, the
``.done`` events, then ``response.completed`` (whose response's ``status`` says
``incomplete`` when ``max_output_tokens`` cut it short), or an ``error`` event if
the generation failed. When the reply was generated but storing it failed, the
``.done`` events come as usual and an ``error`` event with code
``response_not_stored`` takes the place of ``response.completed``. Each event is
sent as ``event: <type>`` plus ``data: <json>``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from prefixcache.client import ContentEvent, ParsedReply, RequestDelta, StoredResponse
from server.chat_protocol import encode
from server.errors import engine_error
from server.generation import Tally
from server.responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponseTimings,
    ResponseUsage,
)

if TYPE_CHECKING:
    from server.responses_routes import Job

logger = logging.getLogger(__name__)
NOT_STORED = "response_not_stored"  # the error code when a generated reply was not stored


def status_of(finish_reason: str | None) -> str:
    """``completed``, or ``incomplete`` when the output hit ``max_output_tokens``."""
    return "incomplete" if finish_reason == "length" else "completed"


def usage(
    num_input: int, num_cached: int, num_output: int, timings: ResponseTimings | None = None
) -> ResponseUsage:
    """The Responses API's usage block, with input tokens served from the cache."""
    return ResponseUsage(
        input_tokens=num_input,
        input_tokens_details=InputTokensDetails(cached_tokens=num_cached),
        output_tokens=num_output,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=num_input + num_output,
        timings=timings,
    )


def job_timings(job: Job, tally: Tally) -> ResponseTimings | None:
    """The tally's stage timings with the response store's lookup split out."""
    base = tally.timings()
    if base is None:
        return None
    fields = msgspec.structs.asdict(base)
    store_ms = 1000 * job.store_s
    # prepared.tokenize_s spans the store lookup too, so that ttft_ms adds up.
    fields["tokenize_ms"] -= store_ms
    return ResponseTimings(store_ms=store_ms, **fields)


def message_id(response_id: str) -> str:
    """The id of a response's output message, derived from the response's id."""
    return "msg_" + response_id.removeprefix("resp_")


def _message(response_id: str, text: str | None, status: str) -> OutputMessage:
    content = [] if text is None else [OutputText(text=text)]
    return OutputMessage(id=message_id(response_id), status=status, content=content)


def assistant_message(reply: ParsedReply) -> dict | None:
    """The reply as the assistant message to store, when it made tool calls (None: its
    text is the whole message)."""
    if not reply.calls:
        return None
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in reply.calls
    ]
    return {"role": "assistant", "content": reply.content, "tool_calls": calls}


def _call_items(calls) -> list[FunctionCallItem]:
    """Function-call output items from ``(call_id, name, arguments)`` triples."""
    return [
        FunctionCallItem(id="fc_" + call_id.removeprefix("call_"), call_id=call_id, name=name,
                         arguments=arguments)
        for call_id, name, arguments in calls
    ]  # fmt: skip


def _stored_calls(entry: StoredResponse) -> list[FunctionCallItem]:
    last = entry.messages[-1] if entry.messages else {}
    return _call_items(
        (c["id"], c["function"]["name"], c["function"]["arguments"])
        for c in last.get("tool_calls") or ()
    )


def _incomplete(finish_reason: str | None) -> IncompleteDetails | None:
    return IncompleteDetails(reason="max_output_tokens") if finish_reason == "length" else None


def job_response(job: Job, tally: Tally | None) -> ResponseObject:
    """The response object of a running (no ``tally``) or finished request."""
    req, rid = job.req, job.prepared.request_id
    if tally is None:
        status, output, counts = "in_progress", [], None
    else:
        status = status_of(tally.finish_reason)
        reply = job.reply(tally)
        calls = _call_items((c.id, c.name, c.arguments) for c in reply.calls)
        output = [_message(rid, reply.content, status), *calls]
        counts = usage(
            tally.num_prompt_tokens,
            tally.num_cached_tokens,
            tally.num_output_tokens,
            job_timings(job, tally),
        )
    failed = job.not_stored
    return ResponseObject(
        id=rid,
        created_at=job.created_at,
        status=status,
        model=job.model,
        output=output,
        usage=counts,
        previous_response_id=req.previous_response_id,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        store=req.store and failed is None,
        user=req.user,
        metadata=req.metadata or {},
        incomplete_details=_incomplete(tally.finish_reason) if tally else None,
        error=ResponseError(code=NOT_STORED, message=str(failed)) if failed else None,
    )


def stored_response_object(entry: StoredResponse, model: str) -> ResponseObject:
    """The response object of a stored response (``GET /v1/responses/{id}``)."""
    status = status_of(entry.finish_reason)
    return ResponseObject(
        id=entry.id,
        created_at=int(entry.created_at),
        status=status,
        model=model,
        output=[_message(entry.id, _stored_text(entry), status), *_stored_calls(entry)],
        usage=usage(entry.num_input_tokens, entry.num_cached_tokens, entry.num_output_tokens),
        previous_response_id=entry.previous_response_id,
        instructions=entry.instructions,
        incomplete_details=_incomplete(entry.finish_reason),
    )


def _stored_text(entry: StoredResponse) -> str:
    last = entry.messages[-1] if entry.messages else {}
    return last["content"] if last.get("tool_calls") else entry.output_text


class _Events:
    """Numbers and encodes one stream's events."""

    def __init__(self, job: Job) -> None:
        self.job, self.seq = job, 0
        self.item_id = message_id(job.prepared.request_id)

    def __call__(self, kind: str, **fields) -> bytes:
        event = ResponseEvent(type=kind, sequence_number=self.seq, **fields)
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + encode(event) + b"\n\n"

    def text(self, kind: str, **fields) -> bytes:
        """An event about the one text part of the one output item."""
        return self(kind, item_id=self.item_id, output_index=0, content_index=0, **fields)


async def response_events(
    job: Job,
    deltas: AsyncIterator[RequestDelta],
    save: Callable[[Tally], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """The event stream of one response; ``save`` stores it before it completes."""
    ev, tally = _Events(job), Tally.of(job.prepared)
    parser = job.prepared.tool_parser() if job.prepared.tool_parser is not None else None
    yield ev("response.created", response=job_response(job, None))
    yield ev("response.in_progress", response=job_response(job, None))
    item = _message(job.prepared.request_id, None, "in_progress")
    yield ev("response.output_item.added", output_index=0, item=item)
    yield ev.text("response.content_part.added", part=OutputText(text=""))
    try:
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                tally.add(delta)
                text = _content(parser, parser.feed(delta.text)) if parser else delta.text
                if text:
                    yield ev.text("response.output_text.delta", delta=text, logprobs=[])
            text = _content(parser, parser.finish()) if parser else ""
            if text:
                yield ev.text("response.output_text.delta", delta=text, logprobs=[])
        await save(tally)
    except Exception as exc:  # headers are sent: report in-band, then end the stream
        yield _error_event(ev, exc)
        return
    final = job_response(job, tally)
    content = job.reply(tally).content
    yield ev.text("response.output_text.done", text=content, logprobs=[])
    yield ev.text("response.content_part.done", part=OutputText(text=content))
    yield ev("response.output_item.done", output_index=0, item=final.output[0])
    for index, item in enumerate(final.output[1:], 1):  # the function calls
        yield ev("response.output_item.added", output_index=index, item=item)
        done = "response.function_call_arguments.done"
        yield ev(done, item_id=item.id, output_index=index, arguments=item.arguments)
        yield ev("response.output_item.done", output_index=index, item=item)
    if job.not_stored is not None:
        yield _event_bytes(ev, NOT_STORED, str(job.not_stored))
        return
    yield ev("response.completed", response=final)


def _content(parser, events: list) -> str:
    """The reply text among a tool parser's events (calls come as items at the end)."""
    return "".join(e.text for e in events if isinstance(e, ContentEvent))


def _error_event(ev: _Events, exc: Exception) -> bytes:
    """The error event for ``exc``, coded as a non-streamed request's error would be."""
    rid = ev.job.prepared.request_id
    try:
        error = engine_error(exc)
    except Exception:  # not an engine failure: a bug, whose details stay in the log
        logger.error("response stream %s failed", rid, exc_info=exc)
        return _event_bytes(ev, "server_error", "internal server error; see the server log")
    logger.error("response stream %s failed: %s", rid, error.message)
    return _event_bytes(ev, error.code or "server_error", error.message)


def _event_bytes(ev: _Events, code: str, message: str) -> bytes:
    """An ``error`` event with ``code`` and ``message``."""
    body = encode(
        {
            "type": "error",
            "code": code,
            "message": message,
            "param": None,
            "sequence_number": ev.seq,
            "error": {"code": code, "message": message},
        }
    )
    return b"event: error\ndata: " + body + b"\n\n"
