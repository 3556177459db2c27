"""Hooks into a served engine's forward pass, for tests that act at a known step.

A test that must do something while a request is running (hang up, send more
requests, fail the engine) holds the engine before a forward pass instead of hoping
the reply takes long enough. ``wrap_forward`` is the one place that knows where the
engine keeps its model runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from server_harness import on_engine

from prefixcache.client import InProcessEngineClient

Forward = Callable[..., Any]
_WAIT_S = 60.0  # a bound on waiting for the engine thread, never a synchronization


def wrap_forward(client: InProcessEngineClient, wrapper: Callable[[Forward], Forward]) -> Callable:
    """Make the engine run ``wrapper(run)`` for each forward pass; returns an undo.

    Installed on the loop thread, so it takes effect from the next step on.
    """

    def install(engine) -> Forward:
        runner = engine.core.runner
        original = runner.run
        runner.run = wrapper(original)
        return original

    original = on_engine(client, install)
    return lambda: on_engine(client, lambda engine: setattr(engine.core.runner, "run", original))


class ForwardGate:
    """Holds the engine before every forward pass until the test lets one through."""

    def __init__(self) -> None:
        self._permits = threading.Semaphore(0)
        self._held = threading.Semaphore(0)  # released once per forward pass that waits
        self._open = False

    def wrap(self, run: Forward) -> Forward:
        """``run`` behind the gate (for ``wrap_forward``)."""

        def gated(*args: Any, **kwargs: Any) -> Any:
            if not self._open:
                self._held.release()
                self._permits.acquire()
            return run(*args, **kwargs)

        return gated

    def wait_until_held(self) -> None:
        """Return once the engine waits at the gate (a request is running)."""
        if not self._held.acquire(timeout=_WAIT_S):
            raise TimeoutError(f"no forward pass reached the gate in {_WAIT_S}s")

    def allow_one(self) -> None:
        """Let one forward pass through."""
        self._permits.release()

    def open(self) -> None:
        """Let every forward pass through from now on."""
        self._open = True
        self._permits.release()  # the one waiting now, if any


@contextlib.contextmanager
def forward_gate(client: InProcessEngineClient) -> Iterator[ForwardGate]:
    """A closed ``ForwardGate`` on the engine's forward pass; opened and removed after."""
    gate = ForwardGate()
    undo = wrap_forward(client, gate.wrap)
    try:
        yield gate
    finally:
        gate.open()
        undo()


def step_until_idle(client: InProcessEngineClient, gate: ForwardGate, limit: int) -> int:
    """Let a held engine run one forward pass at a time until it has no request left;
    returns how many passes that took. Raises AssertionError after ``limit`` passes.

    Each check is queued before the pass is allowed, so the engine runs it right after
    that pass, never while held at the gate.
    """

    def idle(engine) -> bool:
        stats = engine.stats()
        return not stats["running"] and not stats["waiting"]

    async def run() -> int:
        for passes in range(limit):
            check = client.loop.call(idle)
            gate.allow_one()
            if await check:
                return passes + 1
        raise AssertionError(f"the engine still had requests after {limit} forward passes")

    return asyncio.run(run())
