"""The engine loop: an engine's core stepped in its own thread, fed from asyncio.

Only the loop thread touches the engine. Callers hand it work through a command
queue; it hands results back to each request's asyncio queue on the caller's loop.
Prompts arrive validated (see ``InputProcessor``); the loop does not check them again.

A step that fails only fails its requests (see ``EngineCore.step``). The loop itself
stops, failing every request, when anything else raises or when
``MAX_FAILED_STEPS`` steps in a row fail (the model or device is broken, not one
request).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from prefixcache.engine.errors import EngineDeadError
from prefixcache.engine.output_processor import FinalOnly
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams
from prefixcache.sdk import Engine

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3


class DeltaQueue(asyncio.Queue):
    """One request's deltas as the engine hands them over, or the exception that ended
    them. ``finished`` says whether the finishing delta was taken: a stream left before
    that must abort its request."""

    def __init__(self) -> None:
        super().__init__()
        self.finished = False

    async def next_delta(self) -> RequestDelta:
        """The next delta; raises what ended the stream, or the request's own error."""
        item = await self.get()
        if isinstance(item, BaseException):
            raise item
        self.finished = item.finish_reason is not None
        if item.error is not None:
            raise item.error
        return item


class _Target(NamedTuple):
    """Where a request's deltas go; ``final`` folds them when only the result is wanted."""

    loop: asyncio.AbstractEventLoop
    queue: DeltaQueue
    final: FinalOnly | None


class EngineLoop:
    """Steps ``engine.core`` in a background thread and streams deltas to coroutines.

    With ``start`` False no thread is started: the owner calls ``run`` on a thread of
    its own. On CPU the engine should step on the thread that loaded it (the engine
    process's main thread, ``InProcessEngineClient.start``'s thread): on any other,
    a second OpenMP pool made steps 25-30% slower (docs/perf/http_path.md).
    """

    def __init__(self, engine: Engine, *, start: bool = True) -> None:
        self.engine = engine
        self._commands: list[Callable[[], None]] = []
        self._streams: dict[str, _Target] = {}
        # Futures of ``call`` not yet settled, failed if the loop stops before running them.
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._wakeup = threading.Condition()
        self._running = True
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._stopped = threading.Event()  # set when the loop has ended, however
        if start:
            name = "prefixcache-engine"
            threading.Thread(target=self.run, name=name, daemon=True).start()
        # A runner that fails between steps (a tensor-parallel worker died) stops the
        # loop at once, not at the next request.
        engine.core.runner.on_failure(lambda error: self._submit(functools.partial(_raise, error)))

    # ------------------------------------------------------------ public API

    async def generate(
        self,
        tokens: np.ndarray,
        params: SamplingParams,
        request_id: str | None = None,
        salt: str | None = None,
        *,
        final_only: bool = False,
    ) -> AsyncIterator[RequestDelta]:
        """Stream the deltas of validated prompt ids; leaving early aborts the request.

        With ``final_only`` the loop thread folds the deltas (``FinalOnly``) and hands
        over only the finishing one, holding the whole output: one wake-up per request
        instead of one per step. A dead or stopped loop raises EngineDeadError; a
        request the engine failed raises its error (``RequestDelta.error``).
        """
        self._raise_if_dead()
        request_id = request_id or f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue = DeltaQueue()
        final = FinalOnly() if final_only else None
        self._streams[request_id] = _Target(asyncio.get_running_loop(), queue, final)
        self._submit(lambda: self._add(tokens, params, request_id, salt))
        try:
            while not queue.finished:
                yield await queue.next_delta()
        finally:
            self._streams.pop(request_id, None)
            if not queue.finished:
                self._submit(lambda: self.engine.core.abort(request_id))

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; its stream ends with finish_reason ``abort``."""
        self._submit(lambda: self._deliver([self.engine.core.abort(request_id)]))

    def call(self, fn: Callable[[Engine], Any]) -> asyncio.Future:
        """Run ``fn(engine)`` on the loop thread; await the returned future for its result.

        The future fails with EngineDeadError if the loop stops before running ``fn``.
        """
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = next(self._ids)
        self._calls[key] = (loop, future)

        def run() -> None:
            if self._calls.pop(key, None) is None:  # already failed by _fail_all
                return
            try:
                result = fn(self.engine)
            except Exception as exc:  # handed to the awaiting caller
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._submit(run)
        return future

    def run(self) -> None:
        """Step the engine on the calling thread until the loop stops (for a loop made
        with ``start`` False; a started loop runs this on its own thread)."""
        try:
            self._loop()
        finally:
            self._stopped.set()

    def request_stop(self) -> None:
        """Ask the loop to stop after its current step (``shutdown`` also cleans up)."""
        with self._wakeup:
            self._running = False
            self._wakeup.notify()

    def shutdown(self) -> None:
        """Stop the loop thread; pending streams and calls fail with EngineDeadError."""
        self.request_stop()
        self._stopped.wait(timeout=30)
        self.engine.close()  # e.g. stops tensor-parallel workers
        if self._error is None:
            self._error = EngineDeadError("the engine was shut down")
        self._fail_all(EngineDeadError("the engine was shut down"))

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the loop thread has ended; False if ``timeout`` passed first."""
        return self._stopped.wait(timeout)

    @property
    def is_alive(self) -> bool:
        """False once the loop thread has died of an error or was shut down."""
        return not self._stopped.is_set() and self._error is None

    # ------------------------------------------------------------ loop thread

    def _submit(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _loop(self) -> None:
        try:
            while self._next_commands():
                for command in self._take_commands():
                    command()
                self.engine.core.publish_cache_events()  # what a flush or a pin changed
                if self.engine.core.has_unfinished_requests():
                    self._step()
        except BaseException as exc:  # the loop must report, not vanish
            logger.exception("engine loop died")
            self._error = exc
            if not isinstance(exc, EngineDeadError):
                exc = EngineDeadError(f"engine loop died: {exc!r}")
            self._fail_all(exc)

    def _step(self) -> None:
        core = self.engine.core
        deltas = core.step()
        if core.failed_steps >= MAX_FAILED_STEPS:
            # Dead before the failed requests hear of it: none of their callers can
            # find the engine still alive afterwards.
            self._error = EngineDeadError(f"{core.failed_steps} engine steps failed in a row")
        self._deliver(deltas)
        if self._error is not None:
            raise self._error

    def _add(self, tokens: np.ndarray, params: SamplingParams, request_id: str, salt) -> None:
        try:
            self.engine.core.add(tokens, params, request_id, salt)
        except Exception as exc:  # e.g. a request id already in use: that caller's error
            logger.debug("request %s refused: %r", request_id, exc)
            target = self._streams.get(request_id)
            if target is not None:
                target.loop.call_soon_threadsafe(target.queue.put_nowait, exc)

    def _next_commands(self) -> bool:
        """Sleep while idle; False when asked to stop."""
        with self._wakeup:
            while (
                self._running
                and not self._commands
                and not self.engine.core.has_unfinished_requests()
            ):
                self._wakeup.wait()
            return self._running

    def _take_commands(self) -> list[Callable[[], None]]:
        with self._wakeup:
            commands, self._commands = self._commands, []
        return commands

    def _deliver(self, deltas: Sequence[RequestDelta | None]) -> None:
        for delta in deltas:
            if delta is None:
                continue
            target = self._streams.get(delta.request_id)
            if target is None:
                continue
            if target.final is not None and (delta := target.final.add(delta)) is None:
                continue  # the caller wants the finishing delta only
            target.loop.call_soon_threadsafe(target.queue.put_nowait, delta)

    def _fail_all(self, error: BaseException) -> None:
        for target in list(self._streams.values()):
            _call_soon(target.loop, target.queue.put_nowait, error)
        while self._calls:
            _, (loop, future) = self._calls.popitem()
            _call_soon(loop, _settle, future, None, error)

    def _raise_if_dead(self) -> None:
        if isinstance(self._error, EngineDeadError):
            raise EngineDeadError(str(self._error))
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    """``loop.call_soon_threadsafe`` that tolerates a loop already closed."""
    # RuntimeError: the caller's loop is gone, so nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _raise(error: BaseException) -> None:
    raise error


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
