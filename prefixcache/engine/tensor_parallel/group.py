"""The worker processes of a tensor-parallel engine: start, watch, message, stop.

Rank 0 (this process) serves a ``torch.distributed`` store on 127.0.0.1 and a free
port, spawns ranks 1 .. N-1 and joins them in one process group (``gloo`` on CPU,
``nccl`` on CUDA, one device per rank). Each worker reads rank 0's messages from a
pipe of its own, so an idle engine holds no collective open (nothing times out
while no request comes), and a worker whose rank 0 is gone reads end-of-file and
exits: no worker outlives its engine.

A monitor thread waits on the workers' process sentinels. When one exits unasked it
records why ("tensor-parallel worker 1 exited with signal 9 (SIGKILL)"), kills the
others, and tells the failure callbacks (the engine loop, which then stops). A
collective or a send that fails on rank 0 waits briefly for the monitor's verdict,
so the error the engine reports names the worker that died.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from typing import NamedTuple

import torch
import torch.distributed as dist

from prefixcache.config import EngineConfig
from prefixcache.engine.errors import EngineDeadError
from prefixcache.engine.tensor_parallel.messages import Message, Stop, encode

logger = logging.getLogger(__name__)

_FAILURE_GRACE_S = 5.0  # a failed collective waits this long for the monitor's verdict
_STOP_GRACE_S = 10.0  # a worker asked to stop gets this long before it is killed

FailureCallback = Callable[[EngineDeadError], None]


class WorkerArgs(NamedTuple):
    """What a spawned worker needs to join the group and build its shard."""

    config: EngineConfig
    rank: int
    port: int
    timeout_s: float
    num_threads: int


class WorkerGroup:
    """Ranks 1 .. ``config.tensor_parallel_size - 1`` in spawned processes, and the
    process group over them and this process (rank 0).

    One per process: ``torch.distributed`` keeps one default group per process.
    """

    def __init__(self, config: EngineConfig) -> None:
        """Start the workers and join them in the process group; the workers go on
        loading their shards (``wait_ready``). ``config.tensor_parallel_timeout_s``
        bounds the start and every collective."""
        from prefixcache.engine.tensor_parallel.worker import run_worker

        self.size, timeout_s = config.tensor_parallel_size, config.tensor_parallel_timeout_s
        self.failure: EngineDeadError | None = None
        self._timeout = timedelta(seconds=timeout_s)
        self._failed = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._callbacks: list[FailureCallback] = []
        self._procs: list[mp.process.BaseProcess] = []
        self._conns = []
        _check_can_start(config)
        self._store = dist.TCPStore(
            "127.0.0.1", 0, self.size, True, timeout=self._timeout, wait_for_workers=False
        )
        try:
            self._spawn(run_worker, config, timeout_s)
            self._wait_for("joined")
            dist.init_process_group(
                backend_for(config.device),
                store=self._store,
                rank=0,
                world_size=self.size,
                timeout=self._timeout,
            )
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._watch, name="prefixcache-tp-monitor", daemon=True).start()
        # Before multiprocessing's own exit handler, which would kill the workers.
        atexit.register(self.stop)

    def _spawn(self, target, config: EngineConfig, timeout_s: float) -> None:
        context = mp.get_context("spawn")
        threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // self.size))
        for rank in range(1, self.size):
            receiver, sender = context.Pipe(duplex=False)
            args = WorkerArgs(config, rank, self._store.port, timeout_s, threads)
            proc = context.Process(
                target=target, args=(args, receiver), name=f"prefixcache-tp{rank}", daemon=True
            )
            proc.start()
            receiver.close()  # the worker's end: closed here, so its death breaks the pipe
            self._procs.append(proc)
            self._conns.append(sender)

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard; an error if one died first."""
        self._wait_for("ready")

    def _wait_for(self, stage: str) -> None:
        keys = [f"{stage}/{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + self._timeout.total_seconds()
        while not self._store.check(keys):
            # Sleeps on the sentinels, so a worker that dies while starting is seen at once.
            if wait([p.sentinel for p in self._procs], timeout=0.05):
                rank, proc = next((r, p) for r, p in self._ranks() if not p.is_alive())
                raise RuntimeError(
                    f"{_describe(rank, proc.exitcode)} while starting ({stage}); its error "
                    f"is logged above"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel workers not {stage} after {self._timeout}")

    # -- messages and collectives -----------------------------------------------------

    def send(self, message: Message) -> None:
        """Send ``message`` to every worker (serialized once); ``EngineDeadError`` if the
        group has failed or a worker is gone."""
        self.check()
        payload = encode(message)
        try:
            for conn in self._conns:
                conn.send_bytes(payload)
        except OSError as exc:
            raise self.fail(exc) from exc

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (this rank's first), after a ``ReadBlocks``."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        try:
            dist.gather(_as_bytes(tensor), [_as_bytes(p) for p in parts], dst=0)
        except Exception as exc:
            raise self.fail(exc) from exc
        return parts

    def scatter(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Hand ``shards[r]`` to rank ``r`` (after a ``WriteBlocks``); this rank's shard."""
        mine = torch.empty_like(shards[0])
        try:
            dist.scatter(_as_bytes(mine), [_as_bytes(s) for s in shards], src=0)
        except Exception as exc:
            raise self.fail(exc) from exc
        return mine

    # -- failure ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``EngineDeadError`` if the group has failed."""
        if self.failure is not None:
            raise EngineDeadError(str(self.failure))
        if self._stopping:
            raise EngineDeadError("the tensor-parallel engine was closed")

    def on_failure(self, callback: FailureCallback) -> None:
        """Call ``callback(error)`` (from the monitor thread) when a worker dies; at once
        if one has."""
        with self._lock:
            failure = self.failure
            if failure is None:
                self._callbacks.append(callback)
        if failure is not None:
            callback(failure)

    def fail(self, cause: BaseException) -> EngineDeadError:
        """The error a failed send or collective means, once the workers are stopped: a
        dead worker's (as the monitor saw it) or else ``cause``'s."""
        self._failed.wait(_FAILURE_GRACE_S)
        with self._lock:
            if self.failure is None:
                self.failure = EngineDeadError(f"a tensor-parallel step failed: {cause}")
        self.stop(graceful=False)
        return EngineDeadError(str(self.failure))

    def _watch(self) -> None:
        """The monitor: wait for any worker to exit; unless asked to, fail the group."""
        sentinels = {proc.sentinel: (rank, proc) for rank, proc in self._ranks()}
        ready = wait(list(sentinels))
        rank, proc = sentinels[ready[0]]
        proc.join(1.0)  # reap it, for its exit code
        with self._lock:
            if self._stopping:
                return
            self.failure = EngineDeadError(
                f"{_describe(rank, proc.exitcode)}; the tensor-parallel engine stopped"
            )
            callbacks, self._callbacks = self._callbacks, []
        logger.error("%s", self.failure)
        self._failed.set()
        for _, other in self._ranks():
            if other.is_alive():
                other.kill()
        for callback in callbacks:
            callback(self.failure)

    # -- stop -------------------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        """Stop every worker (asked, then killed after a grace period; at once unless
        ``graceful``) and leave the process group. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        atexit.unregister(self.stop)
        for conn in self._conns:
            if graceful:
                with contextlib.suppress(OSError):  # that worker is gone already
                    conn.send_bytes(encode(Stop()))
            conn.close()
        for _, proc in self._ranks():
            proc.join(_STOP_GRACE_S if graceful else 0.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, rank 1 first."""
        return [proc.pid for proc in self._procs]

    def _ranks(self):
        return enumerate(self._procs, start=1)


def backend_for(device: str) -> str:
    """The collective backend of the ranks' devices: ``nccl`` on CUDA, else ``gloo``."""
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda:rank`` on CUDA (one device per rank), else ``device``."""
    kind = torch.device(device).type
    return torch.device(kind, rank) if kind == "cuda" else torch.device(device)


def _check_can_start(config: EngineConfig) -> None:
    if dist.is_initialized():
        raise RuntimeError(
            "this process already holds a torch.distributed process group; a process "
            "runs one tensor-parallel engine at a time"
        )
    size = config.tensor_parallel_size
    if config.device.startswith("cuda") and torch.cuda.device_count() < size:
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} CUDA devices, "
            f"{torch.cuda.device_count()} are visible"
        )


def _describe(rank: int, code: int | None) -> str:
    if code is None:
        return f"tensor-parallel worker {rank} stopped answering"
    if code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"tensor-parallel worker {rank} exited with signal {-code}{name}"
    return f"tensor-parallel worker {rank} exited with code {code}"


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """One-byte KV (int8, fp8) as uint8: collectives do not all know float8."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor
