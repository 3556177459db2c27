"""What every route shares: the engine client, the served model's name, keys, metrics,
and the Responses API's store and renderer."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from prefixcache.client import ConversationRenderer, EngineClient, ResponseStore
from server.auth import KeyRing
from server.errors import APIError
from server.metrics import ServerMetrics

TOKENIZER_THREADS = 4


class Ticket:
    """One admitted request's place; ``release`` gives it back (idempotent)."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        """Free the place; later calls do nothing."""
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None


@dataclass(slots=True)
class Admission:
    """Caps the requests in flight: ``max_num_seqs`` can run and ``max_queue`` more wait.

    Counted on the event loop thread only, so no lock is needed. A request holds its
    place from acceptance until its response is complete or its client is gone.
    """

    limit: int
    in_flight: int = 0
    draining: bool = False  # shutting down: no new request is admitted

    def acquire(self) -> Ticket:
        """A place for one more request; a 503 while draining, a 429 when the queue is full."""
        if self.draining:
            raise APIError(
                503,
                "the server is shutting down; retry on another replica or after a restart",
                code="draining",
                headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)},
            )
        if self.in_flight >= self.limit:
            raise APIError(
                429,
                f"the server is at capacity ({self.limit} requests in flight); retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        return Ticket(self)


DRAIN_RETRY_AFTER_S = 5


@dataclass(slots=True)
class Drain:
    """A graceful shutdown: admission stops at once, running requests get ``timeout``
    seconds to finish, then the streams still open are cut (``cut`` is set).

    ``begin`` may run in a signal handler: it only sets attributes.
    """

    admission: Admission
    timeout: float
    deadline: float | None = None
    _cut: asyncio.Event | None = None

    @property
    def draining(self) -> bool:
        """True once the shutdown has begun."""
        return self.deadline is not None

    def begin(self) -> None:
        """Stop admitting requests and start the clock on the running ones."""
        if self.deadline is None:
            self.admission.draining = True
            self.deadline = time.monotonic() + self.timeout

    def finished(self) -> bool:
        """True when nothing is in flight any more, or the time is up."""
        assert self.deadline is not None
        return self.admission.in_flight == 0 or time.monotonic() >= self.deadline

    @property
    def cut(self) -> asyncio.Event:
        """Set when the streams still running must end (on the event loop thread)."""
        if self._cut is None:
            self._cut = asyncio.Event()
        return self._cut


@dataclass(slots=True)
class ServerState:
    """The state behind one app; routes reach it as ``request.app.state.server``."""

    client: EngineClient
    model_name: str
    keys: KeyRing
    admission: Admission
    max_body_bytes: int
    drain: Drain
    request_timeout: float | None = None  # seconds to receive a whole request body
    metrics_keys: KeyRing = field(default_factory=KeyRing)  # empty: /metrics is open
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    # Tokenizing and chat templating run here, off the event loop. More than one
    # thread, so one long prompt (bounded by the context limit) never holds up others.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="prefixcache-tokenize"
        )
    )
    created: int = field(default_factory=lambda: int(time.time()))
    responses: ResponseStore | None = None  # made on first use when none was given
    _renderer: ConversationRenderer | None = None

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output the engine accepts."""
        return self.client.limits.max_model_len

    @property
    def max_context_tokens(self) -> int:
        """Most prompt plus output tokens one request can have (model limit and KV pool)."""
        return self.client.limits.max_context_tokens

    @property
    def fingerprint(self) -> str:
        """A short id of the served weights (OpenAI's ``system_fingerprint``)."""
        return "fp_" + self.client.limits.fingerprint[:12]

    @property
    def response_store(self) -> ResponseStore:
        """The Responses API's store: next to the disk KV tier if any, else in memory."""
        if self.responses is None:
            disk = self.client.limits.disk_cache_dir
            self.responses = ResponseStore(folder=Path(disk) / "responses" if disk else None)
        return self.responses

    @property
    def renderer(self) -> ConversationRenderer:
        """Renders Responses turns on the engine's tokenizer and chat template."""
        if self._renderer is None:
            self._renderer = ConversationRenderer(self.client.inputs)
        return self._renderer


def server_state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.server
