"""The messages between a front and its engine process, encoded with msgspec.

One message per frame of a ``multiprocessing`` pipe (a Unix socket pair). The front
sends ``Add``, ``Abort``, ``Call``, ``Subscribe`` and ``Shutdown``; the engine sends
``Ready`` (or ``StartFailed``) once, then one ``Deltas`` per engine step carrying every
request's new tokens, ``Reply`` for each ``Call``, ``Events`` for each batch of cache
events, and ``Dead`` when its loop stops. Errors travel as ``WireError`` (their class
name, message and plain attributes) and come back as the same class.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from chunking.bounded import PromptTooLong
from prefixcache.cache.events import ChunkEvent
from prefixcache.engine.errors import (
    EngineDeadError,
    KVCacheBusyError,
    KVCacheExhaustedError,
    ReplicaLostError,
    RequestFailedError,
)
from prefixcache.inputs.limits import EngineLimits
from prefixcache.outputs import RequestDelta, RequestTimings
from prefixcache.sampling_params import SamplingParams
from prefixcache.structured import GrammarError

# Errors that keep their class across the boundary; any other arrives as RuntimeError.
_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        ValueError, TypeError, KeyError, RuntimeError, TimeoutError, OSError,
        FileNotFoundError, PromptTooLong,
        GrammarError, KVCacheExhaustedError, RequestFailedError, KVCacheBusyError,
        ReplicaLostError, EngineDeadError,
    )
}  # fmt: skip
_Plain = int | float | str | bool | None


class WireError(msgspec.Struct, array_like=True):
    """An exception as data: its class name, its message, its plain attributes."""

    type: str
    message: str
    attrs: dict[str, _Plain] = {}


class WireDelta(msgspec.Struct, array_like=True):
    """A ``RequestDelta`` as data."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    timings: tuple[float, float, float, float] | None = None
    error: WireError | None = None
    logprobs: list[float] | None = None


# Front -> engine
class Add(msgspec.Struct, tag=True, array_like=True):
    """Queue a validated prompt (int32 ids as bytes). ``final_only``: send the request's
    finishing delta only, holding all its ids (see ``FinalOnly``)."""

    request_id: str
    prompt: bytes
    params: SamplingParams
    salt: str | None = None
    final_only: bool = False


class Abort(msgspec.Struct, tag=True, array_like=True):
    """Abort a request wherever it is."""

    request_id: str


class Call(msgspec.Struct, tag=True, array_like=True):
    """Run one named cache-control operation on the engine thread (see ``OPERATIONS``)."""

    call_id: int
    op: str
    args: list[Any] = []


class Subscribe(msgspec.Struct, tag=True, array_like=True):
    """Start (or stop) sending cache events."""

    on: bool


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Stop the engine and exit."""


# Engine -> front
class Ready(msgspec.Struct, tag=True, array_like=True):
    """The engine is loaded: its limits, its model folder and end-of-sequence ids."""

    limits: EngineLimits
    model_folder: str
    eos_token_ids: list[int]


class StartFailed(msgspec.Struct, tag=True, array_like=True):
    """Loading the engine raised ``error``; the process exits."""

    error: WireError


class Deltas(msgspec.Struct, tag=True, array_like=True):
    """Everything one engine step (or one abort) added to its requests."""

    deltas: list[WireDelta]


class Reply(msgspec.Struct, tag=True, array_like=True):
    """The result of a ``Call``: ``value`` (raw msgpack, decoded by the caller, who
    knows its type), or ``error``."""

    call_id: int
    value: msgspec.Raw
    error: WireError | None = None


class Events(msgspec.Struct, tag=True, array_like=True):
    """One batch of cache events."""

    events: list[ChunkEvent]


class Dead(msgspec.Struct, tag=True, array_like=True):
    """The engine loop stopped; every pending request and call fails with ``error``."""

    error: WireError


ToEngine = Add | Abort | Call | Subscribe | Shutdown
ToFront = Ready | StartFailed | Deltas | Reply | Events | Dead

encoder = msgspec.msgpack.Encoder()
to_engine = msgspec.msgpack.Decoder(ToEngine)
to_front = msgspec.msgpack.Decoder(ToFront)


def encode_error(exc: BaseException) -> WireError:
    """``exc`` as data (attributes that are not plain values stay behind)."""
    attrs = {k: v for k, v in getattr(exc, "__dict__", {}).items() if isinstance(v, _Plain)}
    message = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    return WireError(type(exc).__name__, message, attrs)


def decode_error(wire: WireError) -> BaseException:
    """The exception ``wire`` describes, of the same class when it is a known one."""
    cls = _ERRORS.get(wire.type)
    if cls is None:
        return RuntimeError(f"{wire.type}: {wire.message}")
    exc = cls.__new__(cls)  # not __init__: its signature varies; args and attrs are set here
    exc.args = (wire.message,)
    for name, value in wire.attrs.items():
        setattr(exc, name, value)
    return exc


def encode_delta(delta: RequestDelta) -> WireDelta:
    """``delta`` as data."""
    error = encode_error(delta.error) if delta.error is not None else None
    return WireDelta(
        delta.request_id, delta.token_ids, delta.text, delta.finish_reason,
        delta.num_prompt_tokens, delta.num_cached_tokens,
        tuple(delta.timings) if delta.timings is not None else None, error, delta.logprobs,
    )  # fmt: skip


def decode_delta(wire: WireDelta) -> RequestDelta:
    """The ``RequestDelta`` ``wire`` describes."""
    return RequestDelta(
        wire.request_id, wire.token_ids, wire.text, wire.finish_reason,
        wire.num_prompt_tokens, wire.num_cached_tokens,
        RequestTimings(*wire.timings) if wire.timings is not None else None,
        decode_error(wire.error) if wire.error is not None else None, wire.logprobs,
    )  # fmt: skip


def prompt_bytes(prompt_ids: np.ndarray) -> bytes:
    """Prompt ids as the int32 bytes ``Add`` carries."""
    return np.ascontiguousarray(prompt_ids, dtype=np.int32).tobytes()


def prompt_ids(data: bytes) -> np.ndarray:
    """The int32 ids of an ``Add`` (a writable copy: the engine keeps it)."""
    return np.frombuffer(data, dtype=np.int32).copy()
