"""The server reports where each request's time went, stage by stage."""

from __future__ import annotations

import json

import httpx
import pytest

from server.testing import running_server


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
