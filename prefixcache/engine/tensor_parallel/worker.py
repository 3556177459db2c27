"""A tensor-parallel worker process: join the group, load this rank's shard, then do
what rank 0 sends until it says stop (or is gone).

A worker never decides anything: rank 0's scheduler chose the chunks and their block
ids, so every rank writes the same blocks of its own pool shard. Any error ends the
worker (its traceback goes to stderr); rank 0's monitor turns the exit into the
engine's failure.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from prefixcache.engine.builder import build_runner
from prefixcache.engine.model_runner import ModelRunner
from prefixcache.engine.tensor_parallel.group import WorkerArgs, _as_bytes, backend_for
from prefixcache.engine.tensor_parallel.messages import (
    ReadBlocks,
    StepPlan,
    Stop,
    WriteBlocks,
    decode,
)
from prefixcache.tiers.transfer import KVTransfer


def run_worker(args: WorkerArgs, conn) -> None:
    """The entry point of rank ``args.rank`` (``WorkerGroup`` spawns it)."""
    torch.set_num_threads(args.num_threads)
    config, size = args.config, args.config.tensor_parallel_size
    timeout = timedelta(seconds=args.timeout_s)
    store = dist.TCPStore("127.0.0.1", args.port, size, False, timeout=timeout)
    store.set(f"joined/{args.rank}", "1")
    backend = backend_for(config.device)
    if backend == "nccl":
        torch.cuda.set_device(args.rank)
    dist.init_process_group(backend, store=store, rank=args.rank, world_size=size, timeout=timeout)
    try:
        runner = build_runner(config, args.rank)
        store.set(f"ready/{args.rank}", "1")
        _serve(runner, conn)
    finally:
        dist.destroy_process_group()


def _serve(runner: ModelRunner, conn) -> None:
    """Run rank 0's messages in order until ``Stop`` or until rank 0's pipe closes."""
    transfer = KVTransfer(runner.kv_cache.layers)
    while True:
        try:
            message = decode(conn.recv_bytes())
        except EOFError:  # rank 0 is gone: nothing more will come
            return
        if isinstance(message, StepPlan):
            runner.run(message.chunks, message.all_logits)  # rank 0 keeps the logits
        elif isinstance(message, ReadBlocks):
            dist.gather(_as_bytes(transfer.read(message.block_ids)), None, dst=0)
        elif isinstance(message, WriteBlocks):
            shape = transfer.copy_shape(len(message.block_ids))
            shard = torch.empty(shape, dtype=transfer.dtype, device=transfer.device)
            dist.scatter(_as_bytes(shard), None, src=0)
            transfer.write(shard, message.block_ids)
        elif isinstance(message, Stop):
            return
        else:
            raise TypeError(f"unknown message from rank 0: {message!r}")
