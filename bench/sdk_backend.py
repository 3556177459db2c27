"""The long-prompt scenarios run through the Python SDK (no HTTP).

Rows have the same keys as the HTTP runs' rows in ``long_prompt.py``, so reports and
charts are the same; an engine stands where a server would, and like a server each
engine runs in a process of its own, so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from prefixcache import Engine, SamplingParams

T = TypeVar("T")


@contextmanager
def started_engine(args: argparse.Namespace, caching: bool) -> Iterator[Engine]:
    """An engine configured as ``prefixcache serve`` would be for the same options."""
    if args.server_threads:
        torch.set_num_threads(args.server_threads)
    from prefixcache.testing import default_model_path

    engine = Engine.from_pretrained(
        args.model or str(default_model_path()),
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        enable_prefix_caching=caching,
        load_format=args.load_format,
        window_kv_cache_tokens=getattr(args, "window_kv_cache_tokens", None),
    )
    try:
        yield engine
    finally:
        del engine
        gc.collect()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_own_process(
    args: argparse.Namespace, caching: bool, fn: Callable[..., T], *fn_args: Any
) -> tuple[T, float]:
    """``fn(engine, *fn_args)`` on a new engine in a fresh child process: its result and
    the child's peak resident memory in MiB, which therefore counts this engine alone
    (a process's peak never goes down, so an engine run before would be counted too).

    ``fn`` and its arguments must be picklable (``fn`` a module-level function).
    """
    # Forked from a clean server process that has only imported what every engine
    # imports: no copy of this process's memory (or threads), no import time per engine.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "transformers", "torch._dynamo"])
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_run_with_engine, args, caching, fn, fn_args).result()


def _run_with_engine(args: argparse.Namespace, caching: bool, fn, fn_args) -> tuple[Any, float]:
    with started_engine(args, caching) as engine:
        result = fn(engine, *fn_args)
    return result, peak_rss_mib()


def send_all(engine: Engine, prompts: list[str], max_tokens: int) -> dict:
    """All prompts at once as single-message chats: total seconds, token counts, and
    the median time of a decode step (a step after every request has its first token)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    lengths, started, last = {}, set(), {}
    for p in prompts:
        tokens = engine.inputs.chat_tokens([{"role": "user", "content": p}])
        lengths[engine.add_request(tokens, params)] = len(tokens)
    decode_steps = []
    while len(last) < len(lengths):
        step_start = time.perf_counter()
        deltas = engine.step()
        if len(started) == len(lengths) and deltas:
            decode_steps.append(time.perf_counter() - step_start)
        for delta in deltas:
            started.add(delta.request_id)
            if delta.finish_reason is not None:
                last[delta.request_id] = delta
    return {
        "seconds": time.perf_counter() - start,
        "prompt_tokens": sum(lengths.values()),
        "cached": sum(d.num_cached_tokens for d in last.values()),
        "decode_step_ms": 1000 * statistics.median(decode_steps) if decode_steps else None,
        "kv_bytes_per_token": engine.stats()["kv_bytes_per_token"],
    }


def chat_turn(engine: Engine, messages: list[dict], max_tokens: int) -> tuple[str, float, dict]:
    """One chat turn stepped here: (text, seconds to first token, usage with timings).

    The clock starts before the chat template and tokenization, as a server's would.
    """
    start = time.perf_counter()
    prompt = engine.inputs.chat_tokens(messages)
    tokenized = time.perf_counter()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    request_id = engine.add_request(prompt, params)
    first, text, last = None, "", None
    while last is None:
        for delta in engine.step():
            if delta.request_id != request_id:
                continue
            first = first if first is not None else time.perf_counter() - start
            text += delta.text
            if delta.finish_reason is not None:
                last = delta
    return text, first, _usage(len(prompt), last, tokenized - start)


def _usage(num_prompt: int, last, tokenize_s: float) -> dict:
    timings = None
    if last.timings is not None:
        t = last.timings
        ttft = tokenize_s + t.queued + t.lookup + t.prefill
        timings = {
            "request_decode_ms": 0.0,
            "tokenize_ms": 1000 * tokenize_s,
            "queue_ms": 1000 * t.queued,
            "lookup_ms": 1000 * t.lookup,
            "prefill_ms": 1000 * t.prefill,
            "ttft_ms": 1000 * ttft,
            "total_ms": 1000 * (ttft + t.decode),
        }
    return {
        "prompt_tokens": num_prompt,
        "prompt_tokens_details": {"cached_tokens": last.num_cached_tokens},
        "timings": timings,
    }
