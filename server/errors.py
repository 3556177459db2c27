"""OpenAI-style error bodies, and handlers that turn every failure into one.

Every error a client can cause is an ``APIError`` with a 4xx status. Anything else
that escapes a route is a bug: it is logged with its traceback and answered with a
generic 500 body that carries no traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from prefixcache.client import (
    EngineDeadError,
    KVCacheBusyError,
    KVCacheExhaustedError,
    ReplicaLostError,
    RequestFailedError,
)
from server.chat_protocol import ErrorBody, ErrorResponse, encode

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}
_MSGSPEC_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


class APIError(Exception):
    """A request failed in a way the client should hear about (status, message, param)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def bad_request(
        cls, message: str, param: str | None = None, code: str | None = None
    ) -> APIError:
        """A 400 ``invalid_request_error``."""
        return cls(400, message, param=param, code=code)

    @classmethod
    def from_decode_error(cls, exc: Exception) -> APIError:
        """A 400 for a body msgspec could not decode; ``param`` is the offending field."""
        message = str(exc) or type(exc).__name__
        if isinstance(exc, RecursionError):
            message = "request body is nested too deeply"
        elif isinstance(exc, UnicodeDecodeError):
            message = "request body is not valid UTF-8"
        elif isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
            message = f"request body is not valid JSON: {message}"
        match = _MSGSPEC_PATH.search(message)
        param = (match.group("path") or None) if match else None
        return cls(400, message, param=param)

    def body(self) -> bytes:
        """The encoded ``{"error": {...}}`` body."""
        return error_body(self.status, self.message, self.param, self.code)


ENGINE_DEAD_MESSAGE = "the engine has stopped; retry later"
REQUEST_FAILED_MESSAGE = "the engine failed while running this request; see the server log"
KV_CACHE_BUSY_RETRY_AFTER_S = 1
REPLICA_LOST_RETRY_AFTER_S = 1  # Serve routes the retry to a live replica


def engine_dead() -> APIError:
    """The 503 for every request the engine can no longer serve."""
    return APIError(503, ENGINE_DEAD_MESSAGE, code="engine_dead")


def engine_error(exc: Exception, param: str | None = None) -> APIError:
    """The one mapping of engine failures to HTTP: a dead engine is a 503, a request the
    engine refuses (``ValueError``) a 400 (``kv_cache_exhausted`` when pins leave too
    little KV cache for it), a request preempted too often, or whose replica was lost,
    a 503 to retry, a request the engine failed while stepping a 500 (its cause stays
    in the server log);
    anything else is re-raised as the bug it is."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return engine_dead()
    if isinstance(exc, KVCacheExhaustedError):
        return APIError.bad_request(str(exc), param=param, code="kv_cache_exhausted")
    if isinstance(exc, ValueError):
        return APIError.bad_request(str(exc), param=param)
    if isinstance(exc, KVCacheBusyError):
        retry = {"Retry-After": str(KV_CACHE_BUSY_RETRY_AFTER_S)}
        return APIError(503, str(exc), code="kv_cache_busy", headers=retry)
    if isinstance(exc, ReplicaLostError):
        retry = {"Retry-After": str(REPLICA_LOST_RETRY_AFTER_S)}
        return APIError(503, str(exc), code="replica_lost", headers=retry)
    if isinstance(exc, RequestFailedError):
        return APIError(500, REQUEST_FAILED_MESSAGE, code="engine_error")
    raise exc


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    """Encode an OpenAI error body for ``status``."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return encode(
        ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    )


def error_response(error: APIError) -> Response:
    """The HTTP response for ``error``."""
    return Response(
        error.body(), error.status, headers=error.headers, media_type="application/json"
    )


def install_error_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """Answer API errors, unknown routes, wrong methods and bugs with OpenAI bodies.

    ``on_error(status)`` is called for every error answered (for metrics).
    """

    async def api_error(request: Request, exc: APIError) -> Response:
        on_error(exc.status)
        return error_response(exc)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        on_error(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        on_error(400)
        return error_response(APIError.bad_request(f"invalid request: {exc.errors()}"))

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        on_error(500)
        body = error_body(500, "internal server error; see the server log")
        return Response(body, 500, media_type="application/json")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
