"""Operations endpoints: liveness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, Response

from server.chat_protocol import encode
from server.errors import APIError, engine_dead
from server.openapi import error, text_operation
from server.state import DRAIN_RETRY_AFTER_S, server_state

logger = logging.getLogger(__name__)
ops_router = APIRouter()
_STATS_TIMEOUT_S = 5.0
_HEALTH_DOC = {
    "responses": {
        "200": {
            "description": "The engine runs and requests are admitted",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"status": {"const": "ok"}},
                        "required": ["status"],
                    }
                }
            },
        },
        "503": error(
            "The engine has stopped (code `engine_dead`) or the server is "
            "draining before it exits (code `draining`)"
        ),
    }
}


@ops_router.get("/health", summary="Liveness", openapi_extra=_HEALTH_DOC)
async def health(request: Request) -> Response:
    """200 while the engine runs and requests are admitted; 503 while draining for a
    shutdown, or once the engine has stopped."""
    state = server_state(request)
    if state.drain.draining:
        raise APIError(
            503,
            "draining: the server is shutting down and admits no new requests",
            code="draining",
            headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)},
        )
    if not state.client.is_alive:
        raise engine_dead()
    return Response(encode({"status": "ok"}), media_type="application/json")


@ops_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,  # so the document lists no JSON body beside it
    openapi_extra=text_operation("text/plain", "Prometheus text exposition format", auth=True),
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: request counters, latencies, cache and block state.

    When the server has a metrics key, it must come as ``Authorization: Bearer <key>``.
    """
    state = server_state(request)
    state.metrics_keys.authenticate(request.headers.get("authorization"))
    try:
        stats = await asyncio.wait_for(state.client.cache_info(), _STATS_TIMEOUT_S)
    except Exception as exc:  # the server's own metrics are still worth serving
        logger.warning("cannot read engine stats: %r", exc)
        stats = None
    return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)
