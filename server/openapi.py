"""The OpenAPI document, with the msgspec Structs' own JSON schemas in it.

FastAPI never sees the request and response types (routes decode and encode with
msgspec), so each route declares its bodies by reference, and ``install_openapi``
adds msgspec's schemas for them under ``components/schemas``. Clients, docs and
fuzzers then see the real request shapes, bounds included.

Where the server serves less than its decoder takes (``n`` must be 1, content parts
must be text, ...), the protocol modules say so in ``DOCUMENTED`` tables merged in
here: the decoder stays wide so that the 400 can name what is unsupported, and the
document promises only what is served. Token ids are bounded by the served vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.chat_protocol import ErrorResponse

_REF = "#/components/schemas/{name}"
_TOKEN_ID_MARK = "x-token-id"


def ref(kind: type) -> dict:
    """A JSON-schema reference to ``kind``'s component schema."""
    return {"$ref": _REF.format(name=kind.__name__)}


def error(description: str) -> dict:
    """A documented response carrying an OpenAI error body."""
    content = {"application/json": {"schema": ref(ErrorResponse)}}
    return {"description": description, "content": content}


def event_stream(events: Iterable[type], done: bool, description: str) -> dict:
    """A ``text/event-stream`` body whose events' ``data`` is one of ``events`` as JSON
    (or ``[DONE]`` when ``done``). As OpenAPI 3.2 has it, ``itemSchema`` is one event
    and ``schema`` the whole stream."""
    data = [
        {"type": "string", "contentMediaType": "application/json", "contentSchema": ref(e)}
        for e in events
    ]
    if done:
        data.append({"const": "[DONE]"})
    item = {
        "type": "object",
        "properties": {"event": {"type": "string"}, "data": {"anyOf": data}},
        "required": ["data"],
    }
    return {
        "schema": {"type": "array", "items": item},
        "itemSchema": item,
        "description": description,
    }


def operation(
    response: type,
    request: type | None = None,
    stream: dict | None = None,
    auth: bool = True,
    not_found: str | None = None,
) -> dict:
    """``openapi_extra`` for a route: its JSON body, responses, and error bodies.

    ``stream`` is the ``event_stream`` of its ``stream: true`` form; ``not_found``
    documents a 404 for an unknown path resource.
    """
    content = {"application/json": {"schema": ref(response)}}
    if stream is not None:
        content["text/event-stream"] = stream
    responses = {"200": {"description": "Success", "content": content}}
    extra: dict = {"responses": responses}
    if request is not None:
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(request)}},
        }
        responses["400"] = error(
            "Malformed or invalid request, or one the engine cannot take. Codes of "
            "refusals the request schema cannot express: `context_length_exceeded` (the "
            "prompt plus its output do not fit), `invalid_grammar` (an output constraint "
            "or tool parameters schema that is not valid or cannot compile; the message "
            "names the construct), `conflicting_constraints` (more than one of "
            "response_format, guided_* and a required or named tool_choice), "
            "`tools_not_supported` (tools to call on a model whose chat template writes "
            "no tool calls), `invalid_tools` (tool_choice without tools or naming none "
            "of them, or two tools of one name)"
        )
        responses["404"] = error("Unknown model")
        responses["408"] = error("The request body was not received in time")
        responses["413"] = error("Request body too large")
        responses["429"] = error("Too many requests in flight")
        responses["503"] = error("The engine has stopped, or the server is shutting down")
    if not_found is not None:
        responses["404"] = error(not_found)
    if auth:
        responses["401"] = error("Missing or wrong API key")
    return extra


def text_operation(media_type: str, description: str, auth: bool = False) -> dict:
    """``openapi_extra`` for a route answering plain text (Prometheus metrics)."""
    content = {media_type: {"schema": {"type": "string"}}}
    responses = {"200": {"description": description, "content": content}}
    if auth:
        responses["401"] = error("Missing or wrong metrics key")
    return {"responses": responses}


def install_openapi(
    app: FastAPI,
    types: Iterable[type],
    documented: Mapping[str, dict] = {},  # noqa: B006 - read only
    vocab_size: int | None = None,
) -> None:
    """Make ``app.openapi()`` include msgspec's schemas of ``types`` and bearer auth.

    ``documented`` narrows component schemas to what the server serves (per component:
    ``properties`` replaced one by one, other keys set); token ids are bounded by
    ``vocab_size``.
    """
    _, components = msgspec.json.schema_components(list(types), ref_template=_REF)
    for name, narrowing in documented.items():
        _narrow(components[name], copy.deepcopy(narrowing))
    _bound_token_ids(components, vocab_size)

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _bound_token_ids(doc["paths"], vocab_size)
            _drop_unreachable_422(doc)
            parts = doc.setdefault("components", {})
            parts.setdefault("schemas", {}).update(components)
            parts["schemas"].pop("HTTPValidationError", None)
            parts["schemas"].pop("ValidationError", None)
            parts.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
            }
            doc["security"] = [{"bearer": []}, {}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _narrow(schema: dict, narrowing: dict) -> None:
    for key, value in narrowing.items():
        if key == "properties":
            schema.setdefault("properties", {}).update(value)
        else:
            schema[key] = value


def _bound_token_ids(node, vocab_size: int | None) -> None:
    """Give every schema marked as a token id the bounds of the served vocabulary."""
    if isinstance(node, dict):
        if node.pop(_TOKEN_ID_MARK, False):
            node["minimum"] = 0
            if vocab_size is not None:
                node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def _drop_unreachable_422(doc: dict) -> None:
    """FastAPI lists a 422 for routes with parameters; this server never sends one
    (path parameters are plain strings, and bodies are decoded by msgspec: 400)."""
    for item in doc.get("paths", {}).values():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
