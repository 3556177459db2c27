"""A tensor-parallel worker that dies fails its engine at once, with a clear error.

Killed while the engine is idle, the monitor stops the engine loop and the other
workers: the server answers 503 with an error body, and shutting down leaves no worker
behind; ``prefixcache serve`` exits by itself with the engine-died status. Killed
during a step, the step's request fails with ``EngineDeadError`` naming the worker,
instead of hanging in a collective.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_harness import on_engine, running_server
from test_server_cli import SMALL, _read_lines, _wait_for_url

from prefixcache import Engine, SamplingParams
from prefixcache.client import EngineDeadError
from server.launch import ENGINE_DIED_EXIT_CODE

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


def _spawned_children(pid: int) -> list[int]:
    """``pid``'s child processes started by multiprocessing's spawn (its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prefixcache_serve_exits_when_a_worker_dies_and_leaves_no_worker(tiny_llama):
    argv = [sys.executable, "-m", "prefixcache.cli", "serve", "--model", str(tiny_llama), *SMALL]
    argv += ["--port", "0", "--log-level", "warning", "--tensor-parallel-size", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        api = _wait_for_url(lines, timeout=120)
        with httpx.Client(trust_env=False, timeout=60) as http:
            assert http.post(api + "/completions", json=BODY).status_code == 200
        [worker] = _spawned_children(proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=60) == ENGINE_DIED_EXIT_CODE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines.queue)
    assert KILLED in log
    assert not _alive(worker)
