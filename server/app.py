"""The app factory: one FastAPI app serving one ``EngineClient``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

from fastapi import FastAPI

import prefixcache
from prefixcache.client import EngineClient, ResponseStore
from server.auth import KeyRing
from server.cache_protocol import CACHE_TYPES
from server.cache_routes import cache_router
from server.chat_protocol import REQUEST_TYPES, RESPONSE_TYPES
from server.chat_routes import router
from server.errors import install_error_handlers
from server.openapi import install_openapi
from server.ops_routes import ops_router
from server.responses_routes import RESPONSES_TYPES
from server.responses_routes import router as responses_router
from server.state import Admission, ServerState

DEFAULT_MAX_QUEUE = 512
DEFAULT_MAX_BODY_BYTES = 64 << 20  # a 200k-token prompt as JSON token ids is ~1.5 MB


def create_app(
    client: EngineClient,
    *,
    model_name: str,
    api_keys: Iterable[str] = (),
    admin_api_keys: Iterable[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    response_store: ResponseStore | None = None,
) -> FastAPI:
    """An OpenAI-compatible app for ``client``'s engine, serving it as ``model_name``.

    With ``api_keys``, every ``/v1`` call needs ``Authorization: Bearer <key>`` and
    each key gets its own prefix-cache namespace; ``admin_api_keys`` are accepted too
    and may act on every tenant (flush the whole cache). At most ``max_num_seqs +
    max_queue`` requests are in flight; more get a 429. The Responses API keeps its
    conversations in ``response_store`` (default: next to the disk KV tier if any,
    else in memory). The caller owns the client and shuts it down after the app stops.
    """
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if not model_name:
        raise ValueError("model_name must be a non-empty string")
    state = ServerState(
        client=client,
        model_name=model_name,
        keys=KeyRing(api_keys, admin_api_keys),
        admission=Admission(client.limits.max_num_seqs + max_queue),
        max_body_bytes=max_body_bytes,
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
    for api in (router, ops_router, cache_router, responses_router):
        app.include_router(api)
    install_openapi(app, REQUEST_TYPES + RESPONSE_TYPES + CACHE_TYPES + RESPONSES_TYPES)
    return app


def _lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    return lifespan
