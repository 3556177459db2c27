"""The OpenAPI document matches the server: a bounded schemathesis run over every operation.

For each documented operation, schemathesis generates bodies, paths and headers from
the document, both valid ones (positive) and invalid ones (negative), sends them to a
real server on 127.0.0.1 and checks the answers against the document: never a 5xx,
only documented status codes and content types, bodies that match their schemas, valid
requests accepted and invalid ones rejected. The run is bounded: a fixed number of
cases per operation and mode, a tiny model, a short context (so generation is cheap).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server_harness import running_server

OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
    ("POST", "/v1/cache/prewarm"),
    ("DELETE", "/v1/cache/pins/{handle}"),
    ("POST", "/v1/cache/flush"),
    ("GET", "/v1/cache"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]
# Invalid inputs exist only where there is a body (path parameters are plain strings).
WITH_BODY = {path for method, path in OPERATIONS if method == "POST"} - {"/v1/cache/flush"}
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if op[1] in WITH_BODY
]
CASES_PER_MODE = 200


# The documented refusals a schema cannot express: a prompt plus its output over the
# context limit, an output constraint the grammar library cannot compile (a JSON schema
# is any object to the document), two constraints at once, tools on a model whose
# template has no tool-call format (the served tiny model's), tool_choice not
# matching the tools. The 400 description of every generating operation lists them.
DOCUMENTED_REFUSALS = {
    "context_length_exceeded",
    "invalid_grammar",
    "conflicting_constraints",
    "tools_not_supported",
    "invalid_tools",
}


def valid_data_accepted(ctx, response, case):
    """schemathesis's positive-data check, except for the documented refusals."""
    if response.status_code == 400 and _error_code(response) in DOCUMENTED_REFUSALS:
        return None
    return positive_data_acceptance(ctx, response, case)


def _error_code(response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    valid_data_accepted,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def served(tiny_llama):
    options = {"max_model_len": 48, "kv_cache_tokens": 4096, "max_num_seqs": 4}
    with running_server(str(tiny_llama), engine_options=options) as server:
        yield server


@pytest.fixture(scope="module")
def schema(served):
    return schemathesis.openapi.from_url(served.url + "/openapi.json")


def test_every_documented_operation_is_exercised(schema):
    documented = {
        (method.upper(), path)
        for path, item in schema.raw_schema["paths"].items()
        for method in item
    }
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(
    ("operation", "mode"), CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.value
)
def test_operation_answers_as_documented(schema, served, operation, mode):
    method, path = operation
    operation = schema[path][method]

    @settings(
        max_examples=CASES_PER_MODE,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_as_documented(case) -> None:
        case.call_and_validate(base_url=served.url, checks=CHECKS)

    answers_as_documented()


def test_document_lists_what_the_fuzzer_cannot_see(schema):
    """Statuses a server never sends, and content a random case rarely reaches."""
    paths = schema.raw_schema["paths"]
    for item in paths.values():
        for op in item.values():
            assert "422" not in op["responses"]  # bodies are decoded by msgspec: 400
    stored = paths["/v1/responses/{response_id}"]
    assert {"404", "401"} <= set(stored["get"]["responses"]) & set(stored["delete"]["responses"])
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    streamed = paths["/v1/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    data = streamed["itemSchema"]["properties"]["data"]["anyOf"]
    assert {d["contentSchema"]["$ref"].rsplit("/", 1)[1] for d in data} == {
        "ResponseEvent",
        "ResponseErrorEvent",
    }
