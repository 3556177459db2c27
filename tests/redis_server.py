"""A real ``redis-server`` for tests: on a free port of 127.0.0.1, no persistence,
bounded by ``maxmemory`` with ``allkeys-lru`` (as the README tells users to run it).

Tests that need one skip with a reason when ``redis-server`` or the ``redis`` package is
missing; CI installs both (``.ci/run``, the ``cluster`` extra).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

_START_S = 30.0  # a bound on waiting for the server to answer, never a synchronization


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_redis() -> None:
    """Skip the calling test unless a Redis server and client can be used."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis", reason="the redis package is missing (prefixcache[cluster])")


class RedisServer:
    """One ``redis-server`` process that a test can stop and start again on its port."""

    def __init__(self, port: int | None = None, db: int = 0) -> None:
        self.port = port or free_port()
        self.db = db
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The ``kv_store`` URL of this server."""
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def client(self):
        """A plain client of the server."""
        import redis

        return redis.Redis.from_url(self.url)

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING."""
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        args += ["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_S
        while True:
            try:
                if self.client().ping():
                    return self
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)  # polling interval while it starts

    def stop(self) -> None:
        """Kill the server (as a crash would) and wait until it is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
