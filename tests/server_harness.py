"""Helpers for tests that run a real server in-process: start one, inspect its engine.

The engine belongs to its loop thread, so tests read it only through
``InProcessEngineClient.run`` (``on_engine`` below), never directly. Needs the ``dev`` extra
(httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from prefixcache import Engine
from prefixcache.client import InProcessEngineClient, ProcessEngineClient
from server.app import create_app
from server.background import BackgroundServer

ENGINE_KINDS = ("thread", "process")  # an engine on a thread of the server, or its own process


class RunningServer(NamedTuple):
    """A server started by ``running_server``: its base URL and its engine client."""

    url: str
    client: InProcessEngineClient | ProcessEngineClient

    @property
    def in_process(self) -> bool:
        """True when the engine runs on a thread of this process (``on_engine`` works)."""
        return isinstance(self.client, InProcessEngineClient)

    @property
    def api_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.url + "/v1"

    def metric(self, name: str, **labels: str) -> float | None:
        """The current value of one Prometheus sample from ``/metrics`` (None: absent)."""
        with httpx.Client(trust_env=False, timeout=30) as http:
            text = http.get(self.url + "/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None

    def wait_until_idle(self, timeout: float = 30.0) -> dict:
        """Wait until the server has no request in flight and the engine is idle.

        Returns the engine's stats; see ``wait_until_idle`` for the engine checks.
        """
        deadline = time.monotonic() + timeout
        while self.metric("prefixcache_server_requests_in_flight"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still in flight after {timeout}s")
            time.sleep(0.02)  # polling interval
        return wait_until_idle(self.client, max(deadline - time.monotonic(), 1.0))


@contextlib.contextmanager
def running_server(
    model: str,
    *,
    model_name: str = "tiny",
    engine_options: dict | None = None,
    engine: str = "thread",
    **app_options,
) -> Iterator[RunningServer]:
    """Load ``model``, serve it on 127.0.0.1 (a free port) in a thread; stop it after.

    ``engine_options`` go to ``Engine.from_pretrained``, ``app_options`` to ``create_app``;
    ``engine`` (one of ``ENGINE_KINDS``) runs the engine on a thread of this process
    or in its own process (``ProcessEngineClient``).
    """
    if engine not in ENGINE_KINDS:
        raise ValueError(f"engine must be one of {ENGINE_KINDS}, got {engine!r}")
    options = {"device": "cpu", **(engine_options or {})}
    if engine == "process":
        # As many torch threads as this process: its outputs match an engine here.
        client = ProcessEngineClient.start(model, num_threads=torch.get_num_threads(), **options)
    else:
        client = InProcessEngineClient(Engine.from_pretrained(model, **options))
    try:
        app = create_app(client, model_name=model_name, **app_options)
        with BackgroundServer(app) as server:
            yield RunningServer(server.url, client)
    finally:
        client.shutdown()


def on_engine(client: InProcessEngineClient, fn: Callable[[Engine], Any]) -> Any:
    """Run ``fn(engine)`` on the engine's loop thread and return its result."""
    return asyncio.run(client.run(fn))


def wait_until_idle(
    client: InProcessEngineClient | ProcessEngineClient, timeout: float = 30.0
) -> dict:
    """Wait until no request runs or waits and no block is locked; return the stats.

    Then check block accounting (``check_integrity``). Raises TimeoutError if the
    engine is still busy after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    if isinstance(client, ProcessEngineClient):
        return _wait_until_process_idle(client, deadline)
    while True:
        stats = on_engine(client, lambda e: e.stats())
        if not stats["running"] and not stats["waiting"] and not stats.get("locked_blocks"):
            on_engine(client, lambda e: e.check_integrity())
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine still busy after {timeout}s: {stats}")
        time.sleep(0.02)  # polling interval


def _wait_until_process_idle(client: ProcessEngineClient, deadline: float) -> dict:
    """``wait_until_idle`` for an engine process, through its cache-control calls."""
    while True:
        info = asyncio.run(client.cache_info())
        if not info.running and not info.waiting and not info.device.locked:
            asyncio.run(client.check_integrity())
            return {"running": 0, "waiting": 0, "locked_blocks": 0, "free_blocks": info.device.free}
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine still busy: {info}")
        time.sleep(0.02)  # polling interval


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists (a reaped child or a gone process: False)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve_subprocess(*args: str) -> tuple[subprocess.Popen, queue.Queue]:
    """``prefixcache serve *args --port 0`` as a subprocess, its output read line by
    line into the queue returned (``wait_for_url`` finds its address there). The
    caller stops the process."""
    argv = [sys.executable, "-m", "prefixcache.cli", "serve", *args, "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def wait_for_url(lines: queue.Queue, timeout: float) -> str:
    """The API address ``prefixcache serve`` printed (``.../v1``), within ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if "serving at http://" in line:
            return line.split("serving at ")[1].split()[0]
    raise TimeoutError("prefixcache serve printed no URL")
