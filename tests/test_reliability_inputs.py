"""A giant prompt is refused after bounded work, without holding up other requests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from server_harness import running_server

from chunking import bounded
from chunking.bounded import PromptTooLong, encode_bounded, piece_chars
from prefixcache.inputs.tokenizer import load_tokenizer

MAX_MODEL_LEN = 512
SENTENCE = "hello world, the quick brown fox jumps. "
GIANT = SENTENCE * 100_000  # 4 MB of text, about 600k tokens
WAIT_S = 60  # a bound so a broken server fails the test instead of hanging it


class EncodeSpy:
    """Wraps a tokenizer's ``encode``: counts the characters it is given, and holds
    the first call on a long text until released, so a test can act meanwhile."""

    def __init__(self, tokenizer, hold_over_chars: int) -> None:
        self.tokenizer, self.original = tokenizer, tokenizer.encode
        self.hold_over = hold_over_chars
        self.chars = 0
        self.lengths: list[int] = []
        self.holding, self.release = threading.Event(), threading.Event()
        tokenizer.encode = self

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        self.chars += len(text)
        if len(text) > self.hold_over and not self.holding.is_set():
            self.holding.set()
            self.release.wait(WAIT_S)
        return self.original(text, *args, **kwargs)

    def restore(self) -> None:
        self.release.set()
        del self.tokenizer.encode


@pytest.fixture(scope="module")
def served(tiny_llama):
    with running_server(str(tiny_llama), engine_options={"max_model_len": MAX_MODEL_LEN}) as s:
        yield s


@pytest.fixture
def spy(served):
    spy = EncodeSpy(served.client.inputs.tokenizer, hold_over_chars=1000)
    yield spy
    spy.restore()


def _post(url: str, body: dict) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=WAIT_S) as http:
        return http.post(url, json=body)


def _chat(content: str, max_tokens: int = 2) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def _assert_too_long(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"longer than {MAX_MODEL_LEN - 1} tokens" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/chat/completions", _chat(GIANT), id="chat"),
        pytest.param("/completions", {"prompt": GIANT, "max_tokens": 2}, id="completion"),
        pytest.param("/responses", {"input": GIANT, "max_output_tokens": 2}, id="responses"),
    ],
)
def test_giant_prompt_is_refused_after_bounded_work_while_a_small_one_is_answered(
    served, spy, path, body
):
    with ThreadPoolExecutor(1) as pool:
        giant = pool.submit(_post, served.api_url + path, body)
        assert spy.holding.wait(WAIT_S), "the giant prompt never reached the tokenizer"
        # The giant holds a tokenizer thread now; a small request still gets through.
        small = _post(served.api_url + "/chat/completions", _chat("hi"))
        assert small.status_code == 200, small.text
        spy.release.set()
        _assert_too_long(giant.result(WAIT_S))
    # Tokenizing stopped near the limit: a small fraction of the 4 MB was encoded.
    assert spy.chars < 4 * piece_chars(MAX_MODEL_LEN) < len(GIANT) // 10


def test_segment_cache_keeps_nothing_of_a_refused_giant(served):
    segments = served.client.inputs.segments
    message = "tell me about foxes"
    _assert_too_long(_post(served.api_url + "/chat/completions", _chat(message + GIANT)))
    assert not any(message in text for text in segments._cache)
    assert sum(map(len, segments._cache)) < len(GIANT) // 10


def test_bounded_encoding_of_a_fitting_text_equals_a_whole_encode(tiny_llama, monkeypatch):
    # Short pieces, so a text that fits is cut many times.
    monkeypatch.setattr(bounded, "piece_chars", lambda limit: 1000)
    tokenizer = load_tokenizer(tiny_llama)
    text = SENTENCE * 400
    whole = tokenizer.encode(text, add_special_tokens=False)
    limit = len(whole)  # exactly at the limit: must still fit
    assert len(text) > 10 * bounded.piece_chars(limit)
    ids = encode_bounded(tokenizer, text, limit)
    np.testing.assert_array_equal(ids, whole)
    with pytest.raises(PromptTooLong) as refused:
        encode_bounded(tokenizer, text, limit - 1)
    assert refused.value.limit == limit - 1
