"""A tensor-parallel worker that dies fails its engine at once, with a clear error.

Killed during a request, the request fails (the server answers 503 with an error
body, the engine's error names the worker) instead of hanging in a collective, and
shutting down leaves no worker behind. Killed while the engine is idle, the monitor
stops the engine: ``prefixcache serve`` exits by itself with the engine-died status.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from engine_hooks import ForwardGate, wrap_forward
from server_harness import (
    on_engine,
    process_alive,
    running_server,
    serve_subprocess,
    wait_for_url,
)
from test_server_cli import SMALL

from prefixcache import SamplingParams
from prefixcache.client import EngineDeadError
from server.launch import ENGINE_DIED_EXIT_CODE

OPTIONS = {"tensor_parallel_size": 2, "kv_cache_tokens": 1024, "tensor_parallel_timeout_s": 60.0}
KILLED = "tensor-parallel worker 1 exited with signal 9"
BODY = {"model": "tiny", "prompt": "hello there", "max_tokens": 3, "temperature": 0}
SERVED = {
    "/completions": BODY,
    "/chat/completions": {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    },
    "/responses": {"model": "tiny", "input": "hi", "max_output_tokens": 3},
}


async def _run(stream) -> None:
    async for _ in stream:
        pass


def test_worker_killed_during_a_request_fails_it_with_503_and_stops_the_engine(tiny_llama):
    with running_server(str(tiny_llama), engine_options=OPTIONS) as server:
        pids = on_engine(server.client, lambda engine: engine.core.runner.group.pids)
        replies = []
        with httpx.Client(trust_env=False, timeout=60) as http:
            for path, body in SERVED.items():  # every endpoint works at TP=2 first
                assert http.post(server.api_url + path, json=body).status_code == 200, path
            gate = ForwardGate()
            wrap_forward(server.client, gate.wrap)  # never undone: the engine dies
            post = threading.Thread(
                target=lambda: replies.append(http.post(server.api_url + "/completions", json=BODY))
            )
            post.start()
            gate.wait_until_held()  # the request's first forward pass is next
            os.kill(pids[0], signal.SIGKILL)
            gate.open()
            post.join()
            assert server.client.wait_stopped(timeout=60)
            later = http.post(server.api_url + "/completions", json=BODY)
        for reply in (*replies, later):
            assert reply.status_code == 503
            assert reply.json()["error"]["code"] == "engine_dead"
        prompt = np.array([5, 6, 7], dtype=np.int32)
        with pytest.raises(EngineDeadError, match=KILLED):
            asyncio.run(_run(server.client.generate(prompt, SamplingParams(max_tokens=2))))
    assert not any(process_alive(pid) for pid in pids)


def _spawned_children(pid: int) -> list[int]:
    """``pid``'s child processes started by multiprocessing's spawn."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prefixcache_serve_exits_when_a_worker_dies_and_leaves_no_worker(tiny_llama):
    flags = ["--log-level", "warning", "--served-model-name", "tiny", "--tensor-parallel-size", "2"]
    proc, lines = serve_subprocess("--model", str(tiny_llama), *SMALL, *flags)
    try:
        api = wait_for_url(lines, timeout=120)
        with httpx.Client(trust_env=False, timeout=60) as http:
            assert http.post(api + "/completions", json=BODY).status_code == 200
        [engine] = _spawned_children(proc.pid)  # serve runs the engine in its own process
        [worker] = _spawned_children(engine)  # whose child is the rank-1 worker
        os.kill(worker, signal.SIGKILL)  # while idle: only the monitor can notice
        assert proc.wait(timeout=60) == ENGINE_DIED_EXIT_CODE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines.queue)
    assert KILLED in log
    assert not process_alive(worker)
    assert not process_alive(engine)
