"""A ``prefixcache serve`` child process for benchmarks that load a server over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx


@contextmanager
def started_server(
    model: str | None,
    url: str | None = None,
    extra: Sequence[str] = (),
    threads: int | None = None,
) -> Iterator[str]:
    """Yield the base URL of ``url`` when given, else of a ``prefixcache serve`` of
    ``model`` (None: the embedded default) started here with ``extra`` options and
    ``threads`` torch threads, stopped on exit."""
    if url:
        yield url.rstrip("/")
        return
    port = free_port()
    cmd = [sys.executable, "-m", "prefixcache.cli", "serve", "--port", str(port)]
    cmd += ["--log-level", "warning", *extra]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ)
    if threads:  # torch reads it at start
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def served_model(url: str) -> str:
    """The model id the server at ``url`` answers to."""
    listing = httpx.get(url + "/v1/models", timeout=30, trust_env=False).json()
    return listing["data"][0]["id"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Wait until ``proc`` serves ``url``/health; a clear error if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling a starting process
    raise TimeoutError("server did not become healthy")
