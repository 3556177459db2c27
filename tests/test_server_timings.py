"""The server reports where each request's time went, stage by stage."""

from __future__ import annotations

import json

import httpx
import pytest
from server_harness import running_server


@pytest.fixture(scope="module")
def served(tiny_llama):
    options = {"kv_cache_tokens": 4096, "max_model_len": 2048}
    with running_server(str(tiny_llama), engine_options=options) as server:
        yield server


def _chat(server, content: str, stream: bool) -> dict:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    with httpx.Client(trust_env=False, timeout=60) as http:
        if not stream:
            return http.post(server.api_url + "/chat/completions", json=body).json()["usage"]
        with http.stream("POST", server.api_url + "/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    return json.loads(lines[-1][len("data: ") :])["usage"]


@pytest.mark.parametrize("stream", [False, True])
def test_usage_carries_stage_timings(served, stream):
    usage = _chat(served, "tell me about timing " * 20, stream)
    timings = usage["timings"]
    stages = ["request_decode_ms", "tokenize_ms", "queue_ms", "lookup_ms", "prefill_ms"]
    assert all(timings[name] >= 0 for name in stages)
    assert timings["ttft_ms"] == pytest.approx(sum(timings[name] for name in stages), rel=1e-6)
    assert timings["total_ms"] >= timings["ttft_ms"] > 0


def test_server_timing_header_when_asked(served):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with httpx.Client(trust_env=False, timeout=60) as http:
        url = served.api_url + "/chat/completions"
        asked = http.post(url, json=body, headers={"X-Prefixcache-Timings": "1"})
        plain = http.post(url, json=body)
    assert "server-timing" not in plain.headers
    stages = dict(part.split(";dur=") for part in asked.headers["server-timing"].split(", "))
    assert list(stages) == ["request_decode", "tokenize", "queue", "lookup", "prefill", "decode"]
    assert all(float(ms) >= 0 for ms in stages.values())


def test_stage_histograms_are_exported(served):
    _chat(served, "count my stages", stream=False)
    with httpx.Client(trust_env=False, timeout=60) as http:
        text = http.get(served.url + "/metrics").text
    for stage in ("request_decode", "tokenize", "queue", "lookup", "prefill", "decode"):
        assert f'prefixcache_request_stage_seconds_count{{stage="{stage}"}}' in text
