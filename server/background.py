"""Run an app on uvicorn in a background thread: for tests, notebooks and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn
from starlette.types import ASGIApp


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound to ``host:port`` (port 0: any free port).

    Binding here, before uvicorn starts, means the real port is known up front and
    no other process can take it in between.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # Listening now: a client that connects once the port is announced waits in the
    # backlog until the server accepts, instead of being refused while it starts.
    sock.listen(2048)
    return sock


class BackgroundServer:
    """Serves ``app`` with uvicorn in a daemon thread until ``stop``; a context manager.

    ``url`` is the base address (``http://host:port``) once ``start`` has returned,
    which it does when ``GET /health`` answers 200.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        server_class: type[uvicorn.Server] = uvicorn.Server,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self.server_class = server_class
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving and wait (at most ``timeout`` seconds) until it is healthy."""
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level=self.log_level, timeout_graceful_shutdown=5, lifespan="on"
        )
        self._server = self.server_class(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
        )
        self._thread.start()
        self._wait_until_healthy(timeout)
        return self

    @property
    def server(self) -> uvicorn.Server | None:
        """The uvicorn server, once started."""
        return self._server

    @property
    def running(self) -> bool:
        """True while the server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the server thread to end by itself."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during startup; see its log")
            if _healthy(self.url + "/health"):
                return
            time.sleep(delay)  # polling interval, not synchronization
            delay = min(delay * 2, 0.2)
        self.stop()
        raise TimeoutError(f"server at {self.url} not healthy after {timeout}s")


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
