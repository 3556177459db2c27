"""Fuzz the request bodies: whatever a client sends, the server answers below 500.

Three kinds of bodies: valid OpenAI requests with random values in every field
(these reach the engine: streaming or not, sampling, stops, salts, token prompts);
the same with one field replaced by a random JSON value (each validation path);
and raw bytes or arbitrary JSON. Generation stays short: ``max_tokens`` is always
at most 4 or invalid.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import running_server

SETTINGS = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VOCAB = 768  # the tiny model's
ROLES = ["system", "user", "assistant", "tool", "developer"]
INT64 = {"min_value": -(2**63), "max_value": 2**63 - 1}

# Any text, lone surrogates included (JSON-escaped by json.dumps).
text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
few_tokens = st.integers(min_value=1, max_value=4)
content = text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content})
sampling = {
    "model": st.just("tiny"),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0, max_value=1, exclude_min=True),
    "top_k": st.integers(min_value=-1, max_value=2000),
    "seed": st.integers(**INT64),
    "stop": text | st.lists(text, max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
    "user": text,
    "cache_salt": text,
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(),  # unsupported fields are ignored
}
valid_chat = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": few_tokens},
    optional={**sampling, "max_completion_tokens": few_tokens, "logprobs": st.just(False)},
)
token_ids = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=30)
valid_completion = st.fixed_dictionaries(
    {
        "prompt": text
        | token_ids
        | st.lists(text, min_size=1, max_size=1)
        | token_ids.map(lambda ids: [ids]),
        "max_tokens": few_tokens,
    },
    optional={**sampling, "echo": st.just(False), "suffix": st.none()},
)
# A replacement value, unless it is a valid but long max_tokens.
wild = json_values.filter(lambda v: not (isinstance(v, int) and 4 < v < 10**4))
FIELDS = sorted({*sampling, "messages", "prompt", "max_tokens", "max_completion_tokens"})


def _mutated(valid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` bodies with one field set to a random JSON value."""
    return st.builds(
        lambda body, key, value: {**body, key: value}, valid, st.sampled_from(FIELDS), wild
    )


chat_bodies = valid_chat | _mutated(valid_chat)
completion_bodies = valid_completion | _mutated(valid_completion)


@pytest.fixture(scope="module")
def served(tiny_llama):
    with running_server(
        str(tiny_llama), engine_options={"kv_cache_tokens": 8192, "max_model_len": 2048}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def http():
    with httpx.Client(trust_env=False, timeout=120) as client:
        yield client


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in response.text
    else:
        usage = response.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 0


def _post(http: httpx.Client, url: str, body: bytes | str) -> None:
    _check(http.post(url, content=body, headers={"Content-Type": "application/json"}))


@SETTINGS
@given(body=chat_bodies)
def test_fuzzed_chat_bodies_never_get_a_5xx(served, http, body):
    _post(http, served.api_url + "/chat/completions", json.dumps(body))


@SETTINGS
@given(body=completion_bodies)
def test_fuzzed_completion_bodies_never_get_a_5xx(served, http, body):
    _post(http, served.api_url + "/completions", json.dumps(body))


@SETTINGS
@given(
    path=st.sampled_from(["/chat/completions", "/completions"]),
    body=st.binary(max_size=64) | json_values.map(json.dumps).map(str.encode),
)
def test_fuzzed_raw_bodies_never_get_a_5xx(served, http, path, body):
    _post(http, served.api_url + path, body)


def test_fuzzing_left_no_request_running_and_no_block_leaked(served, http):
    stats = served.wait_until_idle()
    assert stats["locked_blocks"] == 0
