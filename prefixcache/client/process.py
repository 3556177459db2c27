"""``ProcessEngineClient``: an engine in its own process, behind ``EngineClient``.

As vLLM's engine core and SGLang's scheduler do, the engine steps in a child process
(``engine_process.py``) and the front keeps only what fronts do: tokenizing and
validating (its own ``InputProcessor`` over the tokenizer and the limits the engine
sent when it was ready) and streaming. The two talk over a ``multiprocessing`` pipe in
msgspec messages (``wire.py``); the engine sends one message per step with every
request's new token ids; the front's reader thread detokenizes them and applies the
stop strings (``DeltaText``), then hands each event loop one batch per message. A
request answered in one body (``final_only``) costs the front nothing per step: the
engine sends its finishing delta only (unless stop strings need each step's ids).

The engine process dying (killed, crashed, its loop stopped) fails every pending
stream and call with ``EngineDeadError``, as do all later calls; ``shutdown`` stops
the child and waits for it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from prefixcache.cache.events import CacheEventCallback
from prefixcache.cache.pins import PinHandle
from prefixcache.client import wire
from prefixcache.client.engine_process import run_engine_process
from prefixcache.client.protocol import PrewarmResult
from prefixcache.client.request_stream import RequestStream
from prefixcache.engine.errors import EngineDeadError
from prefixcache.engine.stats import EngineStats
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.processor import InputProcessor
from prefixcache.inputs.tokenizer import load_tokenizer
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams
from prefixcache.structured import GrammarCache

logger = logging.getLogger(__name__)

_PREFILL_ONLY = SamplingParams(max_tokens=1)
_STOP_WAIT_S = 30.0  # how long shutdown waits for the child before killing it
_Target = tuple[asyncio.AbstractEventLoop, asyncio.Future]


class ProcessEngineClient:
    """Serves an engine running in a child process; owns that process.

    Start one with ``ProcessEngineClient.start(model, **options)`` (the options of
    ``Engine.from_pretrained``); it returns once the engine is loaded.
    """

    def __init__(self, process: Any, conn: Any, ready: wire.Ready) -> None:
        self._process, self._conn = process, conn
        self._send_lock = threading.Lock()
        # Before multiprocessing's own exit handler, which joins the (non-daemonic) child.
        atexit.register(self._stop_at_exit)
        self._limits = ready.limits
        tokenizer = load_tokenizer(Path(ready.model_folder))
        self._tokenizer = tokenizer  # detokenizes the engine's ids (see _deliver)
        grammars = GrammarCache(tokenizer, ready.limits.vocab_size, frozenset(ready.eos_token_ids))
        self._inputs = InputProcessor(tokenizer, ready.limits, grammars)
        self._lock = threading.Lock()  # guards the tables below and _error
        self._streams: dict[str, RequestStream] = {}
        self._calls: dict[int, _Target] = {}
        self._subscribers: list[CacheEventCallback] = []
        self._error: EngineDeadError | None = None
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="prefixcache-engine-pipe")
        self._reader.daemon = True
        self._reader.start()

    @classmethod
    def start(
        cls,
        model: str,
        *,
        log_level: str = "WARNING",
        num_threads: int | None = None,
        **options: Any,
    ) -> ProcessEngineClient:
        """Start an engine process loading ``model``; raises what loading raised there.

        ``num_threads``: torch's intra-op threads there (None: torch's default).
        """
        context = multiprocessing.get_context("spawn")  # no forked torch or threads
        conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(
            target=run_engine_process,
            args=(child_conn, model, options, log_level, num_threads),
            name="prefixcache-engine",
            # Not a daemon: a daemonic process may not start processes, and a
            # tensor-parallel engine starts its workers. A front that exits without
            # shutdown() still stops it (_stop_at_exit).
            daemon=False,
        )
        process.start()
        child_conn.close()  # only the child holds its end: its exit reads as EOF here
        try:
            first = wire.to_front.decode(conn.recv_bytes())
        except (EOFError, OSError):
            process.join(_STOP_WAIT_S)
            conn.close()
            raise EngineDeadError(
                f"the engine process exited while loading (exit code {process.exitcode})"
            ) from None
        if isinstance(first, wire.StartFailed):
            process.join(_STOP_WAIT_S)
            conn.close()
            raise wire.decode_error(first.error)
        return cls(process, conn, first)

    @property
    def limits(self) -> EngineLimits:
        """What the engine accepts and runs with (as it said when it was ready)."""
        return self._limits

    @property
    def inputs(self) -> InputProcessor:
        """Tokenizes and validates here, in the front, once per request."""
        return self._inputs

    @property
    def is_alive(self) -> bool:
        """False once the engine process has stopped or was shut down."""
        return self._error is None and self._process.is_alive()

    @property
    def pid(self) -> int:
        """The engine process's id."""
        return self._process.pid

    async def generate(
        self,
        prompt_ids: np.ndarray,
        params: SamplingParams,
        request_id: str | None = None,
        salt: str | None = None,
        *,
        final_only: bool = False,
    ) -> AsyncIterator[RequestDelta]:
        """Stream the deltas of validated prompt ids; leaving early aborts the request.

        With ``final_only`` the reader thread folds the deltas and hands over only the
        finishing one (see ``RequestStream``). A request the engine failed or refused raises
        its error (of its own class).
        """
        request_id = request_id or f"proc-{next(self._ids)}"
        with self._lock:
            self._raise_if_dead()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            stream = self._streams[request_id] = RequestStream.open(
                self._tokenizer, params, final_only
            )
        queue = stream.queue
        try:
            # Without stop strings the engine folds the request and sends its end only.
            prompt = wire.prompt_bytes(prompt_ids)
            self._send(wire.Add(request_id, prompt, params, salt, final_only=stream.text_at_end))
            while not queue.finished:
                yield await queue.next_delta()
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not queue.finished:
                with contextlib.suppress(EngineDeadError):
                    self._send(wire.Abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request wherever it is."""
        self._send(wire.Abort(request_id))

    async def prewarm(
        self,
        prompt_ids: np.ndarray,
        *,
        pin: bool = False,
        ttl: float | None = None,
        salt: str | None = None,
    ) -> PrewarmResult:
        """Prefill as an ordinary one-token request, as the in-process client does."""
        if pin:
            await self._call("check_pinnable", None, len(prompt_ids), ttl, salt)
        reused = 0
        async for delta in self.generate(prompt_ids, _PREFILL_ONLY, salt=salt):
            reused = delta.num_cached_tokens
        if not pin:
            cached = await self._call("peek", int, wire.prompt_bytes(prompt_ids), salt)
            return PrewarmResult(len(prompt_ids), cached, reused)
        handle = await self.pin(prompt_ids, salt, ttl)
        return PrewarmResult(
            len(prompt_ids), handle.num_cached_tokens, reused, handle.handle, handle.expires_at
        )

    async def pin(self, prompt_ids: np.ndarray, salt: str | None, ttl: float | None) -> PinHandle:
        """Pin the already cached prefix of ``prompt_ids``."""
        return await self._call("pin", PinHandle, wire.prompt_bytes(prompt_ids), salt, ttl)

    async def unpin(self, handle: str) -> bool:
        """Release a pin; False when it is unknown or expired."""
        return await self._call("unpin", bool, handle)

    async def flush(self, tenant: str | None = None) -> int:
        """Drop every cached entry no request or pin holds; returns the blocks freed."""
        return await self._call("flush", int, tenant)

    async def cache_info(self) -> EngineStats:
        """One snapshot of the engine's and the tiers' counters."""
        return await self._call("cache_info", EngineStats)

    async def check_integrity(self) -> None:
        """Check the engine's block accounting (an ``AssertionError`` crosses as a
        ``RuntimeError`` naming it)."""
        await self._call("check_integrity", None)

    def subscribe_cache_events(self, callback: CacheEventCallback) -> Callable[[], None]:
        """Call ``callback(events)`` on the client's reader thread with each batch of
        the engine's cache events; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)
            first = len(self._subscribers) == 1
        if first:
            self._send(wire.Subscribe(True))

        def unsubscribe() -> None:
            with self._lock:
                if callback not in self._subscribers:
                    return
                self._subscribers.remove(callback)
                last = not self._subscribers
            if last:
                with contextlib.suppress(EngineDeadError):
                    self._send(wire.Subscribe(False))

        return unsubscribe

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the engine process has stopped; False on timeout."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def shutdown(self) -> None:
        """Stop the engine process; pending requests fail with ``EngineDeadError``."""
        atexit.unregister(self._stop_at_exit)
        with contextlib.suppress(EngineDeadError):
            self._send(wire.Shutdown())
        self._process.join(_STOP_WAIT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %ss; killing it", _STOP_WAIT_S)
            self._process.kill()
            self._process.join()
        self._reader.join(_STOP_WAIT_S)
        self._fail_all(EngineDeadError("the engine was shut down"))
        self._conn.close()

    # ------------------------------------------------------------ internals

    def _stop_at_exit(self) -> None:
        # The interpreter exits without shutdown(): ask the child to stop (killing it if
        # it lingers), so that multiprocessing's join of its children never waits forever.
        with contextlib.suppress(EngineDeadError):
            self._send(wire.Shutdown())
        self._process.join(_STOP_WAIT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    async def _call(self, op: str, result_type: Any, *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        call_id = next(self._ids)
        with self._lock:
            self._raise_if_dead()
            self._calls[call_id] = (asyncio.get_running_loop(), future)
        self._send(wire.Call(call_id, op, list(args)))
        raw = await future
        return None if result_type is None else msgspec.msgpack.decode(raw, type=result_type)

    def _send(self, message: Any) -> None:
        data = wire.encoder.encode(message)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except OSError:  # the engine's end is closed: it died
            raise EngineDeadError("the engine process is gone") from None

    def _read(self) -> None:
        """The reader thread: route each message from the engine until its pipe closes."""
        error = EngineDeadError("the engine process stopped")
        try:
            while True:
                message = wire.to_front.decode(self._conn.recv_bytes())
                if isinstance(message, wire.Dead):
                    error = EngineDeadError(f"engine loop died: {message.error.message}")
                    break
                self._route(message)
        except (EOFError, OSError):
            self._process.join(_STOP_WAIT_S)
            code = self._process.exitcode
            error = EngineDeadError(f"the engine process exited (exit code {code})")
        except Exception as exc:  # a message that does not decode: the link is broken
            logger.exception("bad message from the engine process")
            error = EngineDeadError(f"the engine process link broke: {exc!r}")
        self._fail_all(error)

    def _route(self, message: wire.ToFront) -> None:
        match message:
            case wire.Deltas(deltas):
                self._deliver(deltas)
            case wire.Reply(call_id, value, error):
                with self._lock:
                    target = self._calls.pop(call_id, None)
                if target is not None:
                    outcome = wire.decode_error(error) if error is not None else value
                    _call_soon(target[0], _settle, target[1], outcome)
            case wire.Events(events):
                for callback in list(self._subscribers):
                    callback(events)

    def _deliver(self, deltas: list[wire.WireDelta]) -> None:
        """Detokenize the step's deltas; one wake-up per event loop for all of them."""
        with self._lock:
            streams = [(self._streams.get(d.request_id), d) for d in deltas]
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream, wired in streams:
            if stream is not None and (delta := self._output(stream, wired)) is not None:
                batches[stream.loop].append((stream.queue, delta))
        for loop, batch in batches.items():
            _call_soon(loop, _put_all, batch)

    def _output(self, stream: RequestStream, wired: wire.WireDelta) -> RequestDelta | None:
        """``stream``'s share of the step; a request ended here is aborted in the engine."""
        delta = stream.output(wire.decode_delta(wired))
        if stream.stopped:
            with self._lock:
                self._streams.pop(wired.request_id, None)
            with contextlib.suppress(EngineDeadError):
                self._send(wire.Abort(wired.request_id))
        return delta

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for stream in streams:
            _call_soon(stream.loop, stream.queue.put_nowait, EngineDeadError(str(error)))
        for loop, future in calls:
            _call_soon(loop, _settle, future, EngineDeadError(str(error)))

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(str(self._error))


def _put_all(batch: list[tuple[asyncio.Queue, RequestDelta]]) -> None:
    for queue, delta in batch:
        queue.put_nowait(delta)


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.cancelled():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    """``loop.call_soon_threadsafe`` that tolerates a loop already closed."""
    with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody waits
        loop.call_soon_threadsafe(fn, *args)
