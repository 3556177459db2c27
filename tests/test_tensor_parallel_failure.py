"""A tensor-parallel worker that dies fails its engine at once, with a clear error.

Killed while the engine is idle, the monitor stops the engine loop and the other
workers: the server answers 503 with an error body, and shutting down leaves no worker
behind. Killed during a step, the step's request fails with ``EngineDeadError`` naming
the worker, instead of hanging in a collective.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import numpy as np
import pytest
from server_harness import on_engine, running_server

from prefixcache import Engine, SamplingParams
from prefixcache.client import EngineDeadError

OPTIONS = {"tensor_parallel_size": 2, "kv_cache_tokens": 1024, "tensor_parallel_timeout_s": 60.0}
KILLED = "tensor-parallel worker 1 exited with signal 9"
BODY = {"model": "tiny", "prompt": "hello there", "max_tokens": 3, "temperature": 0}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _run(stream) -> None:
    async for _ in stream:
        pass


def test_worker_killed_while_idle_stops_the_engine_and_the_server_answers_503(tiny_llama):
    with running_server(str(tiny_llama), engine_options=OPTIONS) as server:
        pids = on_engine(server.client, lambda engine: engine.core.runner.group.pids)
        with httpx.Client(trust_env=False, timeout=60) as http:
            assert http.post(server.api_url + "/completions", json=BODY).status_code == 200
            os.kill(pids[0], signal.SIGKILL)
            assert server.client.wait_stopped(timeout=60)  # the monitor, not a request
            reply = http.post(server.api_url + "/completions", json=BODY)
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "engine_dead"
        prompt = np.array([5, 6, 7], dtype=np.int32)
        with pytest.raises(EngineDeadError, match=KILLED):
            asyncio.run(_run(server.client.generate(prompt, SamplingParams(max_tokens=2))))
    assert not any(_alive(pid) for pid in pids)


def test_worker_killed_during_a_step_fails_the_request_with_engine_dead_error(tiny_llama):
    with Engine.from_pretrained(str(tiny_llama), device="cpu", **OPTIONS) as engine:
        runner, [pid] = engine.core.runner, engine.core.runner.group.pids
        forward = runner.run

        def kill_then_forward(*args, **kwargs):
            runner.run = forward  # once
            os.kill(pid, signal.SIGKILL)
            return forward(*args, **kwargs)

        runner.run = kill_then_forward
        with pytest.raises(EngineDeadError, match=KILLED):
            engine.generate([list(range(3, 40))], SamplingParams(max_tokens=4))
        # Every later request fails the same way, before any collective.
        with pytest.raises(EngineDeadError, match=KILLED):
            engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
        assert engine.core.requests == {}  # nothing left behind
    assert not _alive(pid)
