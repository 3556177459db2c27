"""The Redis tier's connection: short timeouts, off after a failure, back after a pause,
and the background thread that writes chunks behind the requests.

A Redis that is down or slow must never fail a request nor stall an engine step: every
command runs with short socket timeouts and no client-side retries; the first failure
turns the link off (one warning, rate-limited) and every call is skipped without
touching the network until the back-off has passed (doubling up to a cap while the
server stays away); the next call then tries again, and its success turns the link on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from prefixcache.logs import ThrottledWarning

logger = logging.getLogger(__name__)

DOWN_WARNING_INTERVAL_S = 60.0
SOCKET_TIMEOUT_S = 0.5  # a lookup waits at most this long for a slow server
CONNECT_TIMEOUT_S = 0.25


def connect(url: str):
    """A ``redis.Redis`` client for ``url`` with short timeouts and no retries (query
    parameters of the URL, e.g. ``?socket_timeout=2``, override them)."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise ValueError(
            "kv_store needs the redis package: pip install 'prefixcache[cluster]'"
        ) from None
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def _redis_errors() -> tuple[tuple[type[BaseException], ...], type[BaseException]]:
    """Errors of a server gone or slow (the link goes off), and of any refused command."""
    import redis

    return (redis.ConnectionError, redis.TimeoutError, OSError), redis.RedisError


class RedisLink:
    """Runs commands on one client, turning itself off for a while after a failure.

    Safe to use from the engine's thread and the writer thread at once.
    """

    def __init__(
        self,
        client,
        url: str,
        retry_after_s: float = 1.0,
        max_retry_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.url, self.clock = client, url, clock
        self.retry_after_s, self.max_retry_after_s = retry_after_s, max_retry_after_s
        self.failures = 0  # commands that failed (the server gone, slow, or refusing)
        self.skipped = 0  # commands not tried because the link was off
        self.outages = 0  # times the link went off (what was stored before may be gone)
        self._backoff = retry_after_s
        self._retry_at: float | None = None  # None: on
        self._lock = threading.Lock()
        self._warning = ThrottledWarning(DOWN_WARNING_INTERVAL_S, clock)
        self._down_errors, self._errors = _redis_errors()

    @property
    def is_up(self) -> bool:
        """False while the link is off (after a failure, until its back-off passes)."""
        return self._retry_at is None

    def usable(self) -> bool:
        """True if a command may be tried now: the link is on, or its back-off is over."""
        retry_at = self._retry_at
        if retry_at is None or self.clock() >= retry_at:
            return True
        self.skipped += 1
        return False

    def call(self, command: Callable[[Any], Any], default: Any = None) -> Any:
        """``command(client)``, or ``default`` if the link is off or the command fails."""
        if not self.usable():
            return default
        try:
            result = command(self.client)
        except self._down_errors as exc:
            self._went_down(exc)
            return default
        except self._errors as exc:  # refused (e.g. out of memory): the server is there
            self.failures += 1
            self._warning(logger, "Redis KV store %s refused a command: %s", self.url, exc)
            return default
        if self._retry_at is not None:
            self._came_back()
        return result

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            was_up = self._retry_at is None
            self.outages += was_up
            wait = self.retry_after_s if was_up else self._backoff
            self._backoff = min(max(wait * 2, self.retry_after_s), self.max_retry_after_s)
            self._retry_at = self.clock() + wait
        if was_up:
            self._warning(
                logger,
                "Redis KV store %s failed (%s); its tier is off, lookups are misses and "
                "writes are dropped; retrying in %.1fs",
                self.url,
                exc,
                wait,
            )

    def _came_back(self) -> None:
        with self._lock:
            self._retry_at, self._backoff = None, self.retry_after_s
        logger.warning("Redis KV store %s is back; its tier is on again", self.url)


class WriteBehind:
    """A bounded queue of commands run by one daemon thread on a ``RedisLink``.

    ``submit`` never blocks: when the queue is full the command is dropped and counted.
    """

    def __init__(self, link: RedisLink, max_pending: int) -> None:
        if max_pending <= 0:
            raise ValueError(f"the write queue holds at least one command, got {max_pending}")
        self.link = link
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="prefixcache-redis", daemon=True)
        self._thread.start()

    @property
    def max_pending(self) -> int:
        """Commands the queue holds at most."""
        return self._queue.maxsize

    @property
    def pending(self) -> int:
        """Commands waiting now."""
        return self._queue.qsize()

    def submit(self, command: Callable[[Any], Any]) -> bool:
        """Queue ``command(client)``; False (and counted in ``dropped``) if the queue is full."""
        try:
            self._queue.put_nowait(command)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def submit_spare(self, command: Callable[[Any], Any]) -> bool:
        """Queue ``command`` only while the queue is less than half full: for commands
        that only help (LRU refreshes), so they never crowd out writes. Not counted."""
        if self._queue.qsize() >= self._queue.maxsize // 2:
            return False
        return self.submit(command)

    def drain(self) -> None:
        """Block until every command queued so far has run (or been skipped)."""
        self._queue.join()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            command = self._queue.get()
            try:
                if command is None:
                    return
                self.link.call(command)
            except Exception:  # a bug in one command must not stop the writer
                logger.exception("a Redis KV write failed")
            finally:
                self._queue.task_done()
