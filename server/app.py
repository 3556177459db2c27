"""The app factory: one FastAPI app serving one ``EngineClient``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

import prefixcache
from prefixcache.client import EngineClient, ResponseStore
from server.auth import KeyRing
from server.cache_protocol import CACHE_TYPES
from server.cache_protocol import DOCUMENTED as CACHE_DOCUMENTED
from server.cache_routes import cache_router
from server.chat_protocol import DOCUMENTED as CHAT_DOCUMENTED
from server.chat_protocol import REQUEST_TYPES, RESPONSE_TYPES
from server.chat_routes import router
from server.errors import APIError, error_response, install_error_handlers
from server.openapi import install_openapi
from server.ops_routes import ops_router
from server.responses_protocol import DOCUMENTED as RESPONSES_DOCUMENTED
from server.responses_routes import RESPONSES_TYPES
from server.responses_routes import router as responses_router
from server.state import Admission, Drain, ServerState

DEFAULT_MAX_QUEUE = 512
DEFAULT_MAX_BODY_BYTES = 64 << 20  # a 200k-token prompt as JSON token ids is ~1.5 MB
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


def create_app(
    client: EngineClient,
    *,
    model_name: str,
    api_keys: Iterable[str] = (),
    admin_api_keys: Iterable[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    response_store: ResponseStore | None = None,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    metrics_api_key: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible app for ``client``'s engine, serving it as ``model_name``.

    With ``api_keys``, every ``/v1`` call needs ``Authorization: Bearer <key>`` and
    each key gets its own prefix-cache namespace; ``admin_api_keys`` are accepted too
    and may act on every tenant (flush the whole cache). At most ``max_num_seqs +
    max_queue`` requests are in flight; more get a 429. The Responses API keeps its
    conversations in ``response_store`` (default: next to the disk KV tier if any,
    else in memory). A request body not received within ``request_timeout`` seconds
    gets a 408. On shutdown (``server.launch``) running requests get ``shutdown_timeout``
    seconds to finish. With ``metrics_api_key``, ``/metrics`` needs that bearer key.
    The caller owns the client and shuts it down after the app stops.
    """
    _check_options(max_queue, model_name, request_timeout, shutdown_timeout)
    admission = Admission(client.limits.max_num_seqs + max_queue)
    state = ServerState(
        client=client,
        model_name=model_name,
        keys=KeyRing(api_keys, admin_api_keys),
        admission=admission,
        max_body_bytes=max_body_bytes,
        drain=Drain(admission, shutdown_timeout),
        request_timeout=request_timeout,
        metrics_keys=KeyRing([metrics_api_key] if metrics_api_key else []),
        responses=response_store,
    )

    app = FastAPI(
        title="prefixcache",
        version=prefixcache.__version__,
        description="OpenAI-compatible server with radix-tree prefix caching. "
        "`usage.prompt_tokens_details.cached_tokens` reports prompt tokens served "
        "from the cache.",
        lifespan=_lifespan(state),
    )
    state.metrics.in_flight.set_function(lambda: state.admission.in_flight)
    app.state.server = state
    install_error_handlers(app, state.metrics.record_error)
    app.add_exception_handler(405, _method_not_allowed(state))
    for api in (router, ops_router, cache_router, responses_router):
        app.include_router(api)
    install_openapi(
        app,
        REQUEST_TYPES + RESPONSE_TYPES + CACHE_TYPES + RESPONSES_TYPES,
        CHAT_DOCUMENTED | CACHE_DOCUMENTED | RESPONSES_DOCUMENTED,
        vocab_size=client.limits.vocab_size,
    )
    return app


def _check_options(
    max_queue: int, model_name: str, request_timeout: float | None, shutdown_timeout: float
) -> None:
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if not model_name:
        raise ValueError("model_name must be a non-empty string")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    if not shutdown_timeout >= 0:
        raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout}")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _method_not_allowed(state: ServerState):
    """A 405 whose ``Allow`` lists every method served at the path: Starlette's names
    only the first route there (``GET /v1/responses/{id}`` hid its ``DELETE``)."""

    async def handler(request: Request, exc: StarletteHTTPException) -> Response:
        allowed = {
            method
            for method in _METHODS
            for route in request.app.router.routes
            if route.matches({**request.scope, "method": method})[0] is Match.FULL
        }
        state.metrics.record_error(405)
        allow = ", ".join(sorted(allowed)) or (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} not allowed; allowed: {allow}"
        return error_response(APIError(405, message, headers={"Allow": allow}))

    return handler


def _lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    return lifespan
