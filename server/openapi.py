"""The OpenAPI document, with the msgspec Structs' own JSON schemas in it.

FastAPI never sees the request and response types (routes decode and encode with
msgspec), so each route declares its bodies by reference, and ``install_openapi``
adds msgspec's schemas for them under ``components/schemas``. Clients, docs and
fuzzers then see the real request shapes, bounds included.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.chat_protocol import ErrorResponse

_REF = "#/components/schemas/{name}"


def _ref(kind: type) -> dict:
    return {"$ref": _REF.format(name=kind.__name__)}


def _error(description: str) -> dict:
    content = {"application/json": {"schema": _ref(ErrorResponse)}}
    return {"description": description, "content": content}


def operation(
    response: type, request: type | None = None, chunk: type | None = None, auth: bool = True
) -> dict:
    """``openapi_extra`` for a route: its JSON body, responses, and error bodies."""
    content = {"application/json": {"schema": _ref(response)}}
    if chunk is not None:
        content["text/event-stream"] = {
            "schema": {"type": "string"},
            "description": f"with stream=true: `data: <{chunk.__name__}>` events, then "
            "`data: [DONE]`",
        }
    responses = {"200": {"description": "Success", "content": content}}
    extra: dict = {"responses": responses}
    if request is not None:
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(request)}},
        }
        responses["400"] = _error("Malformed or invalid request")
        responses["404"] = _error("Unknown model")
        responses["429"] = _error("Too many requests in flight")
    if auth:
        responses["401"] = _error("Missing or wrong API key")
    return extra


def install_openapi(app: FastAPI, types: Iterable[type]) -> None:
    """Make ``app.openapi()`` include msgspec's schemas of ``types`` and bearer auth."""
    _, components = msgspec.json.schema_components(list(types), ref_template=_REF)

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            parts = doc.setdefault("components", {})
            parts.setdefault("schemas", {}).update(components)
            parts.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
            }
            doc["security"] = [{"bearer": []}, {}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
