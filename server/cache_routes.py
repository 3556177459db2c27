"""Cache control over HTTP: pre-warm (and pin), unpin, flush, and inspect the cache.

Pre-warming runs as an ordinary one-token request through the engine's loop (so no
other request's output is lost), with the pin-cap check before it and the pin after
it, both on the loop thread. Every entry is salted per tenant like any request.

Pin handles are bound to the tenant that made them: the public handle carries an
HMAC of the engine's handle keyed by the caller's key digest, so another API key
cannot name it (it gets the same 404 as for a handle that never existed).

Flush drops the entries no request or pin holds of the caller's own tenant (every
salt derived from its key); an admin key (``--admin-api-key``) flushes every tenant,
and so does any caller when auth is off (there is one tenant then). Pins are capped
per tenant, and a refusal names only the caller's own pins. ``GET /v1/cache`` reports
totals over all tenants, as ``/metrics`` does.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from prefixcache.client import EngineStats, TierStats
from server.auth import authenticate, tenant_id, tenant_salt
from server.cache_protocol import (
    CacheCounters,
    CacheFlushResponse,
    CacheInfo,
    CachePins,
    CachePrewarmRequest,
    CachePrewarmResponse,
    CacheTier,
    CacheUnpinResponse,
)
from server.chat_protocol import json_response
from server.errors import APIError, engine_error
from server.openapi import operation
from server.prepare import check_fits, check_model, decode, message_dict, read_body, run_tokenizer
from server.state import ServerState, server_state

T = TypeVar("T")
logger = logging.getLogger(__name__)
cache_router = APIRouter()
_MAC_CHARS = 24


def _not_found_doc() -> dict:
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {"description": "No such pin for this API key", "content": content}


def _with_404(extra: dict) -> dict:
    extra["responses"]["404"] = _not_found_doc()
    return extra


@cache_router.post(
    "/v1/cache/prewarm",
    summary="Pre-warm (and optionally pin) a prompt prefix",
    openapi_extra=operation(CachePrewarmResponse, CachePrewarmRequest),
)
async def prewarm(request: Request, tenant: bytes | None = Depends(authenticate)) -> Response:
    """Prefill a prompt or message list into the cache without replying."""
    state = server_state(request)
    req = decode(await read_body(request, state.max_body_bytes), CachePrewarmRequest)
    ticket = state.admission.acquire()
    try:
        return json_response(await _prewarm(state, req, tenant))
    finally:
        ticket.release()


async def _prewarm(
    state: ServerState, req: CachePrewarmRequest, tenant: bytes | None
) -> CachePrewarmResponse:
    check_model(state, req.model)
    prompt_ids = await _prompt_ids(state, req)
    check_fits(state, len(prompt_ids), 1)
    salt = tenant_salt(tenant, req.cache_salt)
    result = await _on_engine(
        state.client.prewarm(prompt_ids, pin=req.pin, ttl=req.ttl_s, salt=salt)
    )
    return CachePrewarmResponse(
        handle=_sign(result.handle, tenant) if result.handle is not None else None,
        num_tokens=result.num_tokens,
        num_cached_tokens=result.num_cached_tokens,
        num_reused_tokens=result.num_reused_tokens,
        pinned=result.pinned,
        expires_at=result.expires_at,
    )


async def _prompt_ids(state: ServerState, req: CachePrewarmRequest):
    if (req.messages is None) == (req.prompt is None):
        raise APIError.bad_request("give exactly one of 'messages' or 'prompt'")
    inputs = state.client.inputs
    if req.messages is not None:
        messages = [message_dict(i, m) for i, m in enumerate(req.messages)]
        return await run_tokenizer(state, lambda: inputs.prewarm_tokens(messages), "messages")
    prompt = req.prompt
    return await run_tokenizer(state, lambda: inputs.prompt_tokens(prompt), "prompt")


@cache_router.delete(
    "/v1/cache/pins/{handle}",
    summary="Release a pin",
    openapi_extra=_with_404(operation(CacheUnpinResponse)),
)
async def unpin(
    handle: str, request: Request, tenant: bytes | None = Depends(authenticate)
) -> Response:
    """Release a pin made by this API key; 404 if unknown, expired or another key's."""
    engine_handle = _verify(handle, tenant)
    client = server_state(request).client
    released = engine_handle is not None and await _on_engine(client.unpin(engine_handle))
    if not released:
        raise APIError(404, f"no pin {handle!r}", param="handle", code="pin_not_found")
    return json_response(CacheUnpinResponse(handle=handle))


@cache_router.post(
    "/v1/cache/flush",
    summary="Drop the caller's cache entries no request or pin holds",
    openapi_extra=operation(CacheFlushResponse),
)
async def flush(request: Request, tenant: bytes | None = Depends(authenticate)) -> Response:
    """Empty the caller's tenant's cache except pinned and in-use entries (every
    tenant's for an admin key, or when auth is off)."""
    state = server_state(request)
    scope = None if tenant is None or state.keys.is_admin(tenant) else tenant_id(tenant)
    freed = await _on_engine(state.client.flush(scope))
    block_size = state.client.limits.block_size
    return json_response(CacheFlushResponse(freed_blocks=freed, freed_tokens=freed * block_size))


@cache_router.get(
    "/v1/cache", summary="Cache sizes and counters", openapi_extra=operation(CacheInfo)
)
async def cache_info(request: Request, tenant: bytes | None = Depends(authenticate)) -> Response:
    """Sizes per tier, hit counters and pins."""
    stats = await _on_engine(server_state(request).client.cache_info())
    return json_response(_info(stats))


def _info(stats: EngineStats) -> CacheInfo:
    query, hits = stats.query_tokens, stats.hit_tokens
    counters = CacheCounters(
        query_tokens=query,
        hit_tokens=hits,
        hit_rate=hits / query if query else 0.0,
        evicted_blocks=stats.tiers[0].evicted_blocks,
    )
    device = stats.device
    tiers = [_tier(t) for t in stats.tiers]
    tiers[0].free_blocks = device.free
    tiers[0].evictable_blocks = device.evictable
    tiers[0].locked_blocks = device.locked
    pins = stats.pins
    return CacheInfo(
        block_size=stats.block_size,
        prefix_caching=stats.prefix_caching,
        kv_bytes_per_token=stats.kv_bytes_per_token,
        tiers=tiers,
        counters=counters,
        pins=CachePins(
            count=pins.count,
            pinned_tokens=pins.pinned_tokens,
            max_pinned_tokens=pins.max_pinned_tokens,
        ),
    )


def _tier(tier: TierStats) -> CacheTier:
    values = tier.counters()
    values["cached_blocks"] = values.pop("used_blocks")
    return CacheTier(name=tier.name, **values)


# --------------------------------------------------------------------- helpers


async def _on_engine(call: Awaitable[T]) -> T:
    """Await a cache-control call; engine failures become HTTP errors."""
    try:
        return await call
    except Exception as exc:
        raise engine_error(exc) from None


def _mac(engine_handle: str, tenant: bytes | None) -> str:
    digest = hmac.new(tenant or b"", engine_handle.encode(), hashlib.sha256).hexdigest()
    return digest[:_MAC_CHARS]


def _sign(engine_handle: str, tenant: bytes | None) -> str:
    """The public handle: the engine's handle bound to the tenant that pinned it."""
    return f"{engine_handle}.{_mac(engine_handle, tenant)}"


def _verify(handle: str, tenant: bytes | None) -> str | None:
    """The engine handle inside ``handle`` if this tenant made it, else None."""
    engine_handle, _, mac = handle.rpartition(".")
    expected = _mac(engine_handle, tenant).encode()
    if not engine_handle or not hmac.compare_digest(mac.encode("utf-8", "replace"), expected):
        return None
    return engine_handle
