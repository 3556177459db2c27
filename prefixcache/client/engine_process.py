"""The engine process: an ``Engine`` stepped by its ``EngineLoop``, served over a pipe.

``run_engine_process`` is the child's whole life: load the engine (answering ``Ready``
with its limits, or ``StartFailed``), then read commands on a thread while the main
thread steps the engine and writes one ``Deltas`` message per step. The child ends when
asked to (``Shutdown``), when the front's end of the pipe closes (the front died: no
orphan outlives it) or when its loop dies (after telling the front so with ``Dead``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import numpy as np
import torch

from prefixcache.client import wire
from prefixcache.engine.loop import EngineLoop
from prefixcache.engine.output_processor import FinalOnly
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams
from prefixcache.sdk import Engine

logger = logging.getLogger(__name__)

# The cache-control operations a front may call, by name: what the in-process client
# runs through ``EngineLoop.call`` (plus two checks tests and tools read).
OPERATIONS: dict[str, Callable[..., Any]] = {
    "check_pinnable": lambda e, n, ttl, salt: e.control.check_pinnable(n, ttl, salt),
    "peek": lambda e, ids, salt: e.control.peek(wire.prompt_ids(ids), salt),
    "pin": lambda e, ids, salt, ttl: e.control.pin(wire.prompt_ids(ids), salt, ttl),
    "unpin": lambda e, handle: e.control.unpin(handle),
    "flush": lambda e, tenant: e.control.flush(tenant),
    "cache_info": lambda e: e.core.snapshot(),
    "check_integrity": lambda e: e.check_integrity(),
}
_NONE = msgspec.Raw(wire.encoder.encode(None))


class _Outbox:
    """The child's end of the pipe, written by the loop thread and the reader thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = wire.encoder.encode(message)
        with self._lock, contextlib.suppress(OSError):  # the front is gone: nobody reads
            self.conn.send_bytes(data)


class ServedEngineLoop(EngineLoop):
    """An ``EngineLoop`` whose results go down a pipe instead of to asyncio queues."""

    def __init__(self, engine: Engine, outbox: _Outbox) -> None:
        self.outbox = outbox
        self._unsubscribe: Callable[[], None] | None = None  # set while events are sent
        # Requests whose front wants the finishing delta only: folded here, so a step in
        # which every request is one of them sends nothing and wakes nobody.
        self._finals: dict[str, FinalOnly] = {}
        super().__init__(engine, start=False)  # run_engine_process steps on its main thread

    def add(self, add: wire.Add) -> None:
        """Queue a request; a refusal comes back as its error delta."""
        tokens = wire.prompt_ids(add.prompt)

        def run() -> None:
            if add.final_only:
                self._finals[add.request_id] = FinalOnly()
            self._add(tokens, add.params, add.request_id, add.salt)

        self._submit(run)

    def run_call(self, call: wire.Call) -> None:
        """Run ``call`` on the loop thread between steps; its ``Reply`` goes down the pipe."""

        def run() -> None:
            try:
                value = OPERATIONS[call.op](self.engine, *call.args)
            except Exception as exc:  # the caller's to handle, as in process
                self.outbox.send(wire.Reply(call.call_id, _NONE, wire.encode_error(exc)))
            else:
                raw = msgspec.Raw(wire.encoder.encode(value))
                self.outbox.send(wire.Reply(call.call_id, raw))

        if call.op not in OPERATIONS:
            error = wire.encode_error(ValueError(f"unknown engine operation {call.op!r}"))
            self.outbox.send(wire.Reply(call.call_id, _NONE, error))
            return
        self._submit(run)

    def subscribe(self, on: bool) -> None:
        """Send the engine's cache events from now on (or stop)."""

        def run() -> None:
            if on and self._unsubscribe is None:
                send = self.outbox.send
                self._unsubscribe = self.engine.core.subscribe_cache_events(
                    lambda events: send(wire.Events(list(events)))
                )
            elif not on and self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

        self._submit(run)

    # One message per step: every request's new tokens together.
    def _deliver(self, deltas: Sequence[RequestDelta | None]) -> None:
        batch = [wire.encode_delta(d) for d in map(self._fold, deltas) if d is not None]
        if batch:
            self.outbox.send(wire.Deltas(batch))

    def _fold(self, delta: RequestDelta | None) -> RequestDelta | None:
        """``delta``, or for a final-only request None until the whole of it."""
        if delta is None or (final := self._finals.get(delta.request_id)) is None:
            return delta
        if delta.finish_reason is not None:
            del self._finals[delta.request_id]
        return final.add(delta)

    def _add(self, tokens: np.ndarray, params: SamplingParams, request_id: str, salt) -> None:
        try:
            # Ids only: the front detokenizes and checks the stop strings (DeltaText).
            self.engine.core.add(tokens, params, request_id, salt, detokenize=False)
        except Exception as exc:  # that caller's error: its only delta
            failed = RequestDelta(request_id, [], "", "error", len(tokens), 0, error=exc)
            self._deliver([failed])

    def _fail_all(self, error: BaseException) -> None:
        self.outbox.send(wire.Dead(wire.encode_error(error)))


def run_engine_process(
    conn: Connection,
    model: str,
    options: dict[str, Any],
    log_level: str = "WARNING",
    num_threads: int | None = None,
) -> None:
    """The engine process's entry point (see the module doc)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    # Ctrl-C and SIGTERM reach the whole process group: the front drains first and then
    # stops this process itself (and a front that dies closes the pipe, which ends it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outbox = _Outbox(conn)
    try:
        engine = Engine.from_pretrained(model, **options)
    except Exception as exc:  # reported to the front, which raises it
        outbox.send(wire.StartFailed(wire.encode_error(exc)))
        return
    loop = ServedEngineLoop(engine, outbox)
    eos = sorted(engine.core.eos_token_ids)
    outbox.send(wire.Ready(engine.limits, str(engine.config.model_path), eos))
    # The pipe is read on a thread and the engine steps on this, the main thread, which
    # loaded it: steps on another thread took 25-30% longer (a second OpenMP pool;
    # docs/perf/http_path.md).
    reader = threading.Thread(target=_serve, args=(conn, loop), name="prefixcache-pipe")
    reader.daemon = True  # blocked in recv when the loop dies; the process exit ends it
    reader.start()
    try:
        loop.run()
    finally:
        loop.shutdown()


def _serve(conn: Connection, loop: ServedEngineLoop) -> None:
    """Hand each command to the loop until ``Shutdown``, the front going away, or the
    loop dying; then stop the loop."""
    try:
        while loop.is_alive:
            try:
                message = wire.to_engine.decode(conn.recv_bytes())
            except (EOFError, OSError):  # the front died or closed the pipe
                return
            if isinstance(message, wire.Shutdown):
                return
            _dispatch(loop, message)
    finally:
        loop.request_stop()


def _dispatch(loop: ServedEngineLoop, message: wire.ToEngine) -> None:
    match message:
        case wire.Add():
            loop.add(message)
        case wire.Abort(request_id):
            loop.abort(request_id)
        case wire.Call():
            loop.run_call(message)
        case wire.Subscribe(on):
            loop.subscribe(on)
