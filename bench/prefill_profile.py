"""Profile of a warm turn's prefill: op count, top ops, milliseconds per layer.

The 20M-parameter Qwen2-shaped float32 model (``kv_quant_quality.QWEN2_20M``) in process:
turn 1 caches ``--context-tokens`` ids, then each warm turn sends them again with
``--new-tokens`` new ids (a prefix-cache hit: only the new ids are prefilled). Reports
the median wall time and the main thread's CPU time (at one thread, CPU time does not
count the time a loaded machine keeps the process waiting), per turn and per layer,
and one ``torch.profiler`` trace: aten op calls and the ops with the most self time.

    python bench/prefill_profile.py --threads 1 --out bench/out
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_quant_quality import QWEN2_20M  # noqa: E402
from report import write_report  # noqa: E402

import kernels.torch_ref as torch_ref  # noqa: E402
from prefixcache import Engine, SamplingParams  # noqa: E402
from prefixcache.testing import make_tiny_model  # noqa: E402

_KERNEL = "paged_prefill_f32 (C)"


def warm_turns(engine: Engine, context: list[int], args, rng) -> tuple[list[float], list[float]]:
    """Wall and thread CPU seconds of each warm turn (new ids each time)."""
    one = SamplingParams(max_tokens=1, temperature=0.0)
    wall, cpu = [], []
    for _ in range(args.rounds + 1):  # the first warms up and is dropped
        new = rng.integers(10, 700, args.new_tokens).tolist()
        start, start_cpu = time.perf_counter(), time.thread_time()
        engine.generate([context + new], one)
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return wall[1:], cpu[1:]


def op_profile(engine: Engine, context: list[int], args, rng) -> tuple[int, list[dict]]:
    """Op calls of one warm turn (aten ops and the C prefill kernel) and its top ops
    by self time."""
    new = rng.integers(10, 700, args.new_tokens).tolist()
    kernel = getattr(torch_ref, "prefill_attention", None)
    if kernel is not None:  # a ctypes call is no aten op: name it in the trace
        torch_ref.prefill_attention = _traced(kernel)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as trace:
            engine.generate([context + new], SamplingParams(max_tokens=1, temperature=0.0))
    finally:
        if kernel is not None:
            torch_ref.prefill_attention = kernel
    events = [e for e in trace.key_averages() if e.key.startswith(("aten::", "mkldnn::", _KERNEL))]
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    rows = [
        {"op": e.key, "calls": e.count, "self_share": round(e.self_cpu_time_total / total, 3)}
        for e in top
    ]
    return sum(e.count for e in events), rows


def _traced(kernel):
    def traced(*args):
        with record_function(_KERNEL):
            return kernel(*args)

    return traced


def main(argv: list[str] | None = None) -> None:
    """Build the model, cache the context, time and profile warm turns."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-tokens", type=int, default=8000)
    parser.add_argument("--new-tokens", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--model-dir", default="/tmp/prefixcache-bench-qwen2-20m")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = make_tiny_model(Path(args.model_dir), "qwen2", **QWEN2_20M)
    engine = Engine.from_pretrained(
        str(folder), dtype="float32", max_model_len=args.context_tokens + 1024,
        kv_cache_tokens=2 * args.context_tokens + 4096,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    context = rng.integers(10, 700, args.context_tokens).tolist()
    engine.generate([context], SamplingParams(max_tokens=1, temperature=0.0))
    wall, cpu = warm_turns(engine, context, args, rng)
    calls, top = op_profile(engine, context, args, rng)
    layers = QWEN2_20M["num_hidden_layers"]
    summary = {
        "context_tokens": args.context_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "warm_turn_wall_ms": round(statistics.median(wall) * 1000, 1),
        "warm_turn_thread_cpu_ms": round(statistics.median(cpu) * 1000, 1),
        "thread_cpu_ms_per_layer": round(statistics.median(cpu) * 1000 / layers, 2),
        "op_calls": calls,
        "op_calls_per_layer": round(calls / layers, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    write_report(args.out, "prefill_profile", summary, top)


if __name__ == "__main__":
    main()
