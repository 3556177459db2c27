"""Cache control over HTTP: pre-warm (and pin), unpin, flush, and inspect the cache.

Pre-warming runs as an ordinary one-token request through the engine's loop (so no
other request's output is lost), with the pin-cap check before it and the pin after
it, both on the loop thread. Every entry is salted per tenant like any request.

Pin handles are bound to the tenant that made them: the public handle carries an
HMAC of the engine's handle keyed by the caller's key digest, so another API key
cannot name it (it gets the same 404 as for a handle that never existed).

Flush is server-wide: it needs a valid key when keys are configured, and drops every
tenant's entries that no request or pin holds (the radix cache has no per-salt flush).
It reveals nothing about other tenants' prompts; ``GET /v1/cache`` likewise reports
totals over all tenants, as ``/metrics`` does.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from prefixcache.engine.loop import EngineDeadError
from prefixcache.sampling_params import SamplingParams
from prefixcache.sdk import Engine
from server.auth import tenant_salt
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
from server.errors import APIError
from server.openapi import operation
from server.prepare import decode, message_dict, read_body, run_tokenizer
from server.protocol import json_response
from server.routes import authenticate
from server.state import ServerState

logger = logging.getLogger(__name__)
cache_router = APIRouter()
_PREFILL_ONLY = SamplingParams(max_tokens=1)
_MAC_CHARS = 24


def _state(request: Request) -> ServerState:
    return request.app.state.server


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
    state = _state(request)
    req = decode(await read_body(request, state.max_body_bytes), CachePrewarmRequest)
    ticket = state.admission.acquire()
    try:
        return json_response(await _prewarm(state, req, tenant))
    finally:
        ticket.release()


async def _prewarm(
    state: ServerState, req: CachePrewarmRequest, tenant: bytes | None
) -> CachePrewarmResponse:
    _check_model(state, req.model)
    prompt_ids = await _prompt_ids(state, req)
    try:
        state.engine.engine.check_fits(len(prompt_ids), _PREFILL_ONLY)
    except ValueError as exc:
        raise APIError.bad_request(str(exc), code="context_length_exceeded") from None
    salt = tenant_salt(tenant, req.cache_salt)
    if req.pin:
        await _on_engine(state, lambda e: e.check_pinnable(len(prompt_ids), req.ttl_s))
    reused = await _prefill(state, prompt_ids, salt)
    if req.pin:
        pinned = await _on_engine(state, lambda e: _pin(e, prompt_ids, salt, req.ttl_s))
        handle, cached, expires_at = pinned
        handle = _sign(handle, tenant)
    else:
        cached = await _on_engine(state, lambda e: _peek(e, prompt_ids, salt))
        handle = expires_at = None
    return CachePrewarmResponse(
        handle=handle,
        num_tokens=len(prompt_ids),
        num_cached_tokens=cached,
        num_reused_tokens=reused,
        pinned=req.pin,
        expires_at=expires_at,
    )


async def _prompt_ids(state: ServerState, req: CachePrewarmRequest) -> list[int]:
    if (req.messages is None) == (req.prompt is None):
        raise APIError.bad_request("give exactly one of 'messages' or 'prompt'")
    engine = state.engine.engine
    if req.messages is not None:
        messages = [message_dict(i, m) for i, m in enumerate(req.messages)]
        return await run_tokenizer(state, lambda: engine.prewarm_token_ids(messages), "messages")
    prompt = req.prompt
    return await run_tokenizer(state, lambda: engine.tokenize_prompt(prompt), "prompt")


async def _prefill(state: ServerState, prompt_ids: list[int], salt: str | None) -> int:
    """Run the prompt as a one-token request; returns the tokens it found cached."""
    reused = 0
    try:
        async for delta in state.engine.generate(prompt_ids, _PREFILL_ONLY, salt=salt):
            reused = delta.num_cached_tokens
    except EngineDeadError:
        raise APIError(503, "the engine stopped; retry later", code="engine_dead") from None
    except ValueError as exc:
        raise APIError.bad_request(str(exc)) from None
    return reused


def _peek(engine: Engine, prompt_ids: list[int], salt: str | None) -> int:
    cache = engine.blocks.cache
    return cache.peek(prompt_ids, salt) if cache is not None else 0


def _pin(engine: Engine, prompt_ids: list[int], salt: str | None, ttl: float | None):
    """On the loop thread: pin, and turn the engine's deadline into Unix time."""
    handle = engine.pin_prefix(prompt_ids, salt, ttl)
    expires_at = None
    if handle.expires_at is not None:
        expires_at = time.time() + (handle.expires_at - engine.pins.clock())
    return handle.handle, handle.num_cached_tokens, expires_at


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
    released = engine_handle is not None and await _on_engine(
        _state(request), lambda e: e.unpin(engine_handle)
    )
    if not released:
        raise APIError(404, f"no pin {handle!r}", param="handle", code="pin_not_found")
    return json_response(CacheUnpinResponse(handle=handle))


@cache_router.post(
    "/v1/cache/flush",
    summary="Drop every cache entry no request or pin holds",
    openapi_extra=operation(CacheFlushResponse),
)
async def flush(request: Request, tenant: bytes | None = Depends(authenticate)) -> Response:
    """Empty the cache except pinned and in-use entries (of every tenant)."""
    state = _state(request)
    freed = await _on_engine(state, lambda e: e.flush_cache())
    block_size = state.engine.engine.config.block_size
    return json_response(CacheFlushResponse(freed_blocks=freed, freed_tokens=freed * block_size))


@cache_router.get(
    "/v1/cache", summary="Cache sizes and counters", openapi_extra=operation(CacheInfo)
)
async def cache_info(request: Request, tenant: bytes | None = Depends(authenticate)) -> Response:
    """Sizes per tier, hit counters and pins."""
    return json_response(await _on_engine(_state(request), _info))


def _info(engine: Engine) -> CacheInfo:
    stats, pins = engine.stats(), engine.pins
    counters = CacheCounters(
        query_tokens=stats.get("query_tokens", 0),
        hit_tokens=stats.get("hit_tokens", 0),
        hit_rate=stats["hit_tokens"] / stats["query_tokens"] if stats.get("query_tokens") else 0.0,
        evicted_blocks=stats.get("evicted_blocks", 0),
    )
    return CacheInfo(
        block_size=engine.config.block_size,
        prefix_caching=engine.blocks.cache is not None,
        tiers=_tiers(stats),
        counters=counters,
        pins=CachePins(
            count=len(pins) if pins is not None else 0,
            pinned_tokens=pins.pinned_tokens if pins is not None else 0,
            max_pinned_tokens=pins.max_pinned_tokens if pins is not None else 0,
        ),
    )


def _tiers(stats: dict) -> list[CacheTier]:
    """The device tier, plus ``host``/``disk`` tiers where the stats carry them."""
    tiers = [_tier("device", stats)]
    for name in ("host", "disk"):
        sub = {k.removeprefix(f"{name}_"): v for k, v in stats.items() if k.startswith(f"{name}_")}
        if sub:
            tiers.append(_tier(name, sub))
    return tiers


def _tier(name: str, stats: dict) -> CacheTier:
    return CacheTier(
        name=name,
        capacity_blocks=stats.get("num_blocks", 0),
        cached_blocks=stats.get("cached_blocks", 0),
        free_blocks=stats.get("free_blocks", 0),
        evictable_blocks=stats.get("evictable_blocks", 0),
        locked_blocks=stats.get("locked_blocks", 0),
    )


# --------------------------------------------------------------------- helpers


async def _on_engine(state: ServerState, fn: Callable[[Engine], Any]) -> Any:
    """``fn(engine)`` on the loop thread; its ValueError is a 400, a dead loop a 503."""
    try:
        return await state.engine.call(fn)
    except EngineDeadError:
        raise APIError(503, "the engine stopped; retry later", code="engine_dead") from None
    except ValueError as exc:
        raise APIError.bad_request(str(exc)) from None


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


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
