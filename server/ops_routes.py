"""Operations endpoints: liveness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from server.errors import engine_dead
from server.state import server_state

logger = logging.getLogger(__name__)
ops_router = APIRouter()
_STATS_TIMEOUT_S = 5.0


@ops_router.get("/health", summary="Liveness")
async def health(request: Request) -> Response:
    """200 while the engine runs, 503 once it has stopped."""
    if not server_state(request).client.is_alive:
        raise engine_dead()
    return Response(b'{"status":"ok"}', media_type="application/json")


@ops_router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format: request counters, latencies, cache and block state."""
    state = server_state(request)
    try:
        stats = await asyncio.wait_for(state.client.cache_info(), _STATS_TIMEOUT_S)
    except Exception as exc:  # the server's own metrics are still worth serving
        logger.warning("cannot read engine stats: %r", exc)
        stats = None
    return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)
