"""A front that exits without shutting its engine process down still ends it.

The engine process is not a daemon (a tensor-parallel engine starts its workers from
it), so multiprocessing joins it when the front's interpreter exits: the client's exit
hook must have asked it to stop first, or that join waits forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server_harness import process_alive

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 120  # only a hang gets near this; a run takes seconds
# Starts an engine process, prints its pid and exits without calling shutdown().
FRONT = """
import sys
from prefixcache.client import ProcessEngineClient

client = ProcessEngineClient.start(
    sys.argv[1], device="cpu", max_model_len=256, kv_cache_tokens=1024
)
print(client.pid, flush=True)
"""


def test_a_front_that_exits_without_shutdown_stops_its_engine_process(tiny_llama):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", FRONT, str(tiny_llama)]
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr
    engine_pid = int(done.stdout.split()[0])
    assert not process_alive(engine_pid)
