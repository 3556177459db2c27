"""The Responses API end to end: a real uvicorn server and the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.testing import running_server

BLOCK = 16
KEY_A, KEY_B = "key-a", "key-b"
STORY = "Tell me a long story about a server that remembered whole conversations. " * 3


@pytest.fixture(scope="module")
def served(tiny_llama):
    with running_server(
        str(tiny_llama),
        engine_options={"kv_cache_tokens": 8192, "max_model_len": 2048},
        api_keys=(KEY_A, KEY_B),
    ) as server:
        yield server


def _client(served, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.api_url,
        api_key=key,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=60),
    )


def _respond(client, text, previous=None, **kwargs):
    kwargs = {"max_output_tokens": 8, "temperature": 0, **kwargs}
    if previous is not None:
        kwargs["previous_response_id"] = previous
    return client.responses.create(model="tiny", input=text, **kwargs)


def _chat(client, messages) -> str:
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    return reply.choices[0].message.content


def test_three_turns_by_id_match_chat_completions_of_the_whole_conversation(served):
    client = _client(served)
    messages, previous = [], None
    for question in ("Three turns. " + STORY, "What happened next?", "How did it end?"):
        response = _respond(client, question, previous)
        messages.append({"role": "user", "content": question})
        assert response.output_text == _chat(client, messages)
        messages.append({"role": "assistant", "content": response.output_text})
        assert response.status in ("completed", "incomplete")
        previous = response.id


def test_turn_two_cached_tokens_cover_turn_one_prompt(served):
    client = _client(served)
    first = _respond(client, "Cached turns. " + STORY)
    assert first.usage.input_tokens_details.cached_tokens == 0
    second = _respond(client, "Go on.", first.id)
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= first.usage.input_tokens // BLOCK * BLOCK
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id


def test_streaming_sends_the_responses_events_and_can_be_continued(served):
    client = _client(served)
    events = list(_respond(client, "Streaming. " + STORY, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens > 0
    whole = _respond(client, "Streaming. " + STORY)
    assert whole.output_text == text
    second = _respond(client, "Next?", final.id, stream=True)
    done = [e for e in second if e.type == "response.completed"][0].response
    assert done.usage.input_tokens_details.cached_tokens >= BLOCK


def test_get_and_delete_a_stored_response(served):
    client = _client(served)
    response = _respond(client, "Stored. " + STORY)
    fetched = client.responses.retrieve(response.id)
    assert fetched.id == response.id and fetched.output_text == response.output_text
    assert fetched.usage.input_tokens == response.usage.input_tokens
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        _respond(client, "Next?", response.id)


def test_unknown_and_other_tenant_ids_answer_404_alike(served):
    response = _respond(_client(served), "Tenant A. " + STORY)
    other = _client(served, KEY_B)
    unknown = "resp_" + "0" * 32
    bodies = []
    for rid in (response.id, unknown):
        with pytest.raises(openai.NotFoundError) as caught:
            other.responses.retrieve(rid)
        bodies.append(caught.value.body)
        with pytest.raises(openai.NotFoundError):
            _respond(other, "Steal it.", rid)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(rid)
    assert [b["type"] for b in bodies] == ["not_found_error"] * 2
    assert bodies[0]["message"].replace(response.id, unknown) == bodies[1]["message"]
    assert _client(served).responses.retrieve(response.id).id == response.id


def test_store_false_is_not_kept(served):
    client = _client(served)
    response = _respond(client, "Not stored. " + STORY, store=False)
    assert response.output_text is not None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


@pytest.mark.parametrize(
    "body",
    [
        {"input": []},
        {"input": ""},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        {"input": [{"role": "wizard", "content": "hi"}]},
        {"input": "hi", "max_output_tokens": 0},
        {"input": "hi", "temperature": 5},
        {"input": "hi", "max_output_tokens": 10**6},
    ],
)
def test_bad_input_is_a_400_with_an_error_body(served, body):
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(trust_env=False, timeout=60, headers=headers) as http:
        response = http.post(served.api_url + "/responses", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_responses_schemas_are_in_the_openapi_document(served):
    with httpx.Client(trust_env=False, timeout=60) as http:
        doc = http.get(served.url + "/openapi.json").json()
    assert "ResponseRequest" in doc["components"]["schemas"]
    assert "/v1/responses/{response_id}" in doc["paths"]
