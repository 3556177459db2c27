"""An exception while stepping fails the requests of that step, not the engine.

The victims get a 500 OpenAI error body (streamed: an error event, then ``[DONE]``),
their blocks are released, and the next request is served. Only when the loop cannot
go on (steps keep failing, or the loop itself breaks) does ``/health`` turn 503 and
``prefixcache serve`` exit non-zero, so a supervisor restarts it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from engine_hooks import wrap_forward
from server_harness import running_server

from prefixcache import Engine, SamplingParams
from prefixcache.client import RequestFailedError
from prefixcache.engine.loop import MAX_FAILED_STEPS

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Say something."}]


def _failing(times: int | None):
    """A ``wrap_forward`` wrapper: the next ``times`` forward passes raise (None: all)."""
    left = [times]

    def wrapper(run):
        def failing(*args, **kwargs):
            if left[0] is None or left[0] > 0:
                if left[0] is not None:
                    left[0] -= 1
                raise RuntimeError("simulated device failure")
            return run(*args, **kwargs)

        return failing

    return wrapper


@pytest.fixture
def served(tiny_llama):
    with running_server(str(tiny_llama), engine_options={"kv_cache_tokens": 2048}) as server:
        yield server


@pytest.fixture
def http():
    with httpx.Client(trust_env=False, timeout=60) as client:  # a hang guard only
        yield client


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **fields}


def _stream_data(http, url: str, body: dict) -> list[str]:
    with http.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_failed_step_answers_its_request_500_and_the_next_request_is_served(served, http):
    wrap_forward(served.client, _failing(1))
    url = served.api_url + "/chat/completions"
    reply = http.post(url, json=_chat())
    assert reply.status_code == 500, reply.text
    error = reply.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "simulated" not in error["message"]  # internals stay in the server log
    assert http.post(url, json=_chat()).status_code == 200
    assert http.get(served.url + "/health").status_code == 200
    served.wait_until_idle()  # no request left, no block leaked


def test_a_failed_step_ends_its_stream_with_an_error_event_and_done(served, http):
    wrap_forward(served.client, _failing(1))
    url = served.api_url + "/completions"
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4}
    data = _stream_data(http, url, body)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    after = _stream_data(http, url, body)
    assert after[-1] == "[DONE]" and "error" not in json.loads(after[-2])
    served.wait_until_idle()


def test_steps_failing_again_and_again_stop_the_engine_and_health_says_so(served, http):
    wrap_forward(served.client, _failing(None))
    url = served.api_url + "/chat/completions"
    statuses = [http.post(url, json=_chat()).status_code for _ in range(MAX_FAILED_STEPS)]
    assert statuses == [500] * MAX_FAILED_STEPS
    assert http.get(served.url + "/health").status_code == 503
    assert http.post(url, json=_chat()).status_code == 503


def test_sdk_failed_step_raises_frees_the_batch_and_the_engine_goes_on(tiny_llama):
    engine = Engine.from_pretrained(str(tiny_llama), device="cpu", kv_cache_tokens=2048)
    runner = engine.core.runner
    runner.run = _failing(1)(runner.run)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = [list(range(10, 60)), list(range(70, 140))]
    with pytest.raises(RequestFailedError):
        engine.generate(prompts, params)
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
    outs = engine.generate(prompts, params)
    assert [o.finish_reason for o in outs] == ["length", "length"]
    engine.check_integrity()


def test_both_requests_of_a_failed_step_end_with_the_error(tiny_llama):
    engine = Engine.from_pretrained(str(tiny_llama), device="cpu", kv_cache_tokens=2048)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    ids = {engine.add_request(list(range(10, 40)), params) for _ in range(2)}
    runner = engine.core.runner
    runner.run = _failing(1)(runner.run)
    deltas = engine.step()
    assert {d.request_id for d in deltas} == ids
    assert all(d.finish_reason == "error" and d.error is not None for d in deltas)
    assert engine.core.failed_steps == 1
    engine.check_integrity()


# A server whose engine loop dies at once: ``serve`` must stop and exit non-zero.
_DYING_SERVER = textwrap.dedent(
    """
    import sys
    from prefixcache import Engine
    from prefixcache.client import InProcessEngineClient
    from server.launch import serve_client

    engine = Engine.from_pretrained(sys.argv[1], device="cpu", kv_cache_tokens=1024)

    def broken():
        raise RuntimeError("simulated loop failure")

    engine.core.has_unfinished_requests = broken  # the loop thread's first call
    serve_client(InProcessEngineClient(engine), model_name="tiny", port=0, log_level="warning")
    """
)


def test_serve_exits_non_zero_when_the_engine_loop_dies(tiny_llama):
    try:
        done = subprocess.run(
            [sys.executable, "-c", _DYING_SERVER, str(tiny_llama)],
            cwd=ROOT,  # this checkout's packages
            capture_output=True,
            text=True,
            timeout=120,  # a hang guard: a server that outlives its engine never exits
        )
    except subprocess.TimeoutExpired:
        pytest.fail("serve kept running after its engine died")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "engine stopped" in done.stderr
