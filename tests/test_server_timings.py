"""The server reports where each request's time went, stage by stage."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import httpx
import pytest
from engine_hooks import forward_gate
from server_harness import running_server


@pytest.fixture(scope="module")
def served(tiny_llama):
    options = {"kv_cache_tokens": 4096, "max_model_len": 2048}
    with running_server(str(tiny_llama), engine_options=options) as server:
        yield server


STAGES = ["request_decode_ms", "tokenize_ms", "queue_ms", "lookup_ms", "prefill_ms"]
ROUNDING_MS = 0.002  # Server-Timing durations are printed to 0.001 ms


class ClientClock(NamedTuple):
    """What the client itself measured, in ms from just before sending the request."""

    first_text_ms: float | None  # streams: when the first piece of text arrived
    done_ms: float  # when the whole response was read


def _body(content: str, stream: bool, max_tokens: int = 4) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


def _timed_post(server, body: dict, headers: dict | None = None) -> tuple[httpx.Response, float]:
    """A non-streamed chat completion and the ms the client waited for it."""
    with httpx.Client(trust_env=False, timeout=60) as http:
        sent = time.perf_counter()
        response = http.post(server.api_url + "/chat/completions", json=body, headers=headers)
        return response, 1000 * (time.perf_counter() - sent)


def _timed_chat(server, content: str, stream: bool) -> tuple[dict, ClientClock]:
    """The usage block of one chat completion, and the client's own clock readings."""
    body = _body(content, stream)
    if not stream:
        response, done_ms = _timed_post(server, body)
        return response.json()["usage"], ClientClock(None, done_ms)
    first_text_ms, chunks = None, []
    with httpx.Client(trust_env=False, timeout=60) as http:
        sent = time.perf_counter()
        with http.stream("POST", server.api_url + "/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunks.append(json.loads(line.removeprefix("data: ")))
                choices = chunks[-1]["choices"]
                if first_text_ms is None and choices and choices[0]["delta"].get("content"):
                    first_text_ms = 1000 * (time.perf_counter() - sent)
        done_ms = 1000 * (time.perf_counter() - sent)
    return chunks[-1]["usage"], ClientClock(first_text_ms, done_ms)


@pytest.mark.parametrize("stream", [False, True])
def test_stage_timings_fit_inside_what_the_client_measured(served, stream):
    usage, client = _timed_chat(served, "tell me about timing " * 20, stream)
    timings = usage["timings"]
    # The server's stages are disjoint parts of the client's wait, which began earlier
    # and ended later: the first token is sampled before its text reaches the client.
    assert min(timings[name] for name in STAGES) >= 0
    assert timings["ttft_ms"] <= timings["total_ms"] <= client.done_ms
    if stream:
        assert timings["ttft_ms"] <= client.first_text_ms


def test_prefill_timing_covers_a_forward_pass_the_test_held(served):
    body = _body("hold my prefill " * 10, stream=False)
    with forward_gate(served.client) as gate, ThreadPoolExecutor(1) as pool:
        reply = pool.submit(_timed_post, served, body, {"X-Prefixcache-Timings": "1"})
        gate.wait_until_held()  # admitted, its prefill forward waits for the test
        held_from = time.perf_counter()
        with httpx.Client(trust_env=False, timeout=60) as http:  # the server still answers
            assert http.get(served.api_url + "/models").status_code == 200
        held_ms = 1000 * (time.perf_counter() - held_from)
        gate.open()
        response, client_ms = reply.result()
    timings = response.json()["usage"]["timings"]
    assert held_ms <= timings["prefill_ms"] <= timings["ttft_ms"] <= timings["total_ms"]
    assert timings["total_ms"] <= client_ms
    header = _server_timing(response)
    assert header["prefill"] == pytest.approx(timings["prefill_ms"], abs=ROUNDING_MS)
    assert header["queue"] == pytest.approx(timings["queue_ms"], abs=ROUNDING_MS)


def _server_timing(response: httpx.Response) -> dict[str, float]:
    parts = (part.split(";dur=") for part in response.headers["server-timing"].split(", "))
    return {name: float(ms) for name, ms in parts}


def test_server_timing_header_when_asked(served):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    asked, client_ms = _timed_post(served, body, {"X-Prefixcache-Timings": "1"})
    plain, _ = _timed_post(served, body)
    assert "server-timing" not in plain.headers
    stages = _server_timing(asked)
    assert list(stages) == ["request_decode", "tokenize", "queue", "lookup", "prefill", "decode"]
    assert min(stages.values()) >= 0
    assert sum(stages.values()) <= client_ms + len(stages) * ROUNDING_MS


def test_stage_histograms_are_exported(served):
    _timed_chat(served, "count my stages", stream=False)
    with httpx.Client(trust_env=False, timeout=60) as http:
        text = http.get(served.url + "/metrics").text
    for stage in ("request_decode", "tokenize", "queue", "lookup", "prefill", "decode"):
        assert f'prefixcache_request_stage_seconds_count{{stage="{stage}"}}' in text


def test_completions_report_their_own_decode_and_tokenize_stages(served):
    body = {"model": "tiny", "prompt": "prefix caching " * 40, "max_tokens": 2}
    with httpx.Client(trust_env=False, timeout=60) as http:
        usage = http.post(served.api_url + "/completions", json=body).json()["usage"]
    timings = usage["timings"]
    # Text was decoded and tokenized by the server: neither stage can have taken no time.
    assert timings["request_decode_ms"] > 0 and timings["tokenize_ms"] > 0
    assert timings["ttft_ms"] >= timings["tokenize_ms"] + timings["request_decode_ms"]
