"""Long prompts that come back: TGI v3's 200k-token case, and one 200k-token conversation.

``--scenario tgi-long``: 20 synthetic reports of about 10k tokens each, sent at once
as "Summarize this report: ```...```" (max_tokens 50, temperature 0); the same load
twice, the second run's total time reported; against a server with prefix caching
and one without. Each request is sent non-streamed and timed to its whole answer, as
TGI's own load test for this case does (text-generation-inference
``load_tests/long.js`` POSTs ``/v1/chat/completions`` without ``stream``); its decode
figure is then the server's own per request (usage ``timings``: total less time to
first token). ``--stream`` streams every request instead (SSE), and reports the
median gap between a stream's tokens once all of them decode.
``--scenario conversation``: turn 1 carries the whole context, turn 2 appends the
reply and a short question; the time to first token of turn 2 (streamed), warm and
with the cache off, with the server's own stage timings.
``--api responses`` sends the conversation through ``POST /v1/responses`` instead:
turn 2 carries only the new question and ``previous_response_id``. On the same
server, warm turns by id alternate with chat-completions turns over the same
history (medians of ``--rounds`` each, every question the same token length), and
the same is done over a ``--baseline-context-tokens`` context, whose time outside
the model forward is the baseline for the long context's.

Servers are started here (``prefixcache serve``, with and without prefix caching)
unless ``--url``/``--url-no-cache`` name running ones; ``--backend sdk`` runs the
same scenarios through the ``Engine`` instead of HTTP, each engine in a child process
of its own (so each one's peak memory is its own, as with servers). Both sides of a
comparison get the same warm-up and measured turns and report the same statistic.
By default (``--backend both``) the same load runs in process and then over HTTP,
and the summary sets them side by side: tgi-long's second run over HTTP against in
process (``http_vs_in_process_second_run``) and each one's first run with the cache
on against off (``first_run_cache_on_vs_off_*``); the conversation's warm turn 2
(``http_vs_in_process_turn2``).

    python bench/long_prompt.py --scenario tgi-long --out bench/out
    python bench/long_prompt.py --scenario conversation --context-tokens 200000
    python bench/long_prompt.py --scenario conversation --api responses
    python bench/long_prompt.py --scenario conversation --tiny-arch gemma3_text

``--tiny-arch`` serves a random-weight tiny model of that architecture (Gemma 3's
shape for ``gemma3_text``: five local layers with a 1,024-token window per global
one). For a model with sliding-window layers the conversation report adds the KV
memory per token with and without the hybrid KV cache, at the context measured and
at 128k and 200k tokens (``kv_memory`` in the summary).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdk_backend  # noqa: E402
from report import bar_chart, write_report  # noqa: E402
from server_process import free_port, wait_healthy  # noqa: E402
from sse_client import post_events, post_json  # noqa: E402

VOCABULARY = [
    "revenue",
    "agency",
    "fiscal",
    "program",
    "oversight",
    "audit",
    "committee",
    "report",
    "federal",
    "budget",
    "infrastructure",
    "compliance",
    "department",
    "assessment",
    "evaluation",
    "congress",
    "grant",
    "funding",
    "policy",
    "regional",
    "operations",
    "personnel",
    "contract",
    "procurement",
    "risk",
    "analysis",
    "findings",
    "recommendation",
    "implementation",
    "schedule",
    "estimate",
    "expenditure",
    "statutory",
    "review",
]


def synthetic_report(tokenizer, index: int, target_tokens: int) -> str:
    """A deterministic report of about ``target_tokens`` tokens, varied per ``index``."""
    rng = random.Random(index)
    words = VOCABULARY + [f"{w}{rng.randint(0, 99)}" for w in rng.sample(VOCABULARY, 12)]
    sentences, tokens = [], 0
    while tokens < target_tokens:
        batch = [_sentence(rng, words) for _ in range(50)]
        tokens += len(tokenizer.encode(" ".join(batch), add_special_tokens=False))
        sentences += batch
    ids = tokenizer.encode(f"Report {index}. " + " ".join(sentences), add_special_tokens=False)
    return tokenizer.decode(ids[:target_tokens])


def _sentence(rng: random.Random, words: list[str]) -> str:
    body = " ".join(rng.choice(words) for _ in range(rng.randint(6, 18)))
    return body[0].upper() + body[1:] + rng.choice([".", ".", ";", "!"])


# ----------------------------------------------------------------- servers


@contextmanager
def started_server(args: argparse.Namespace, caching: bool):
    """A ``prefixcache serve`` subprocess; yields (base url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "prefixcache.cli", "serve", "--port", str(port)]
    cmd += ["--log-level", "warning", "--kv-cache-tokens", str(args.kv_cache_tokens)]
    cmd += ["--load-format", args.load_format, "--kv-cache-dtype", args.kv_cache_dtype]
    if args.window_kv_cache_tokens:
        cmd += ["--window-kv-cache-tokens", str(args.window_kv_cache_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    if not caching:
        cmd.append("--no-prefix-caching")
    if args.engine_in_process:
        cmd.append("--engine-in-process")
    env = dict(os.environ)
    if args.server_threads:  # torch reads it at start; leaves cores to the load generator
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextmanager
def server_for(args: argparse.Namespace, caching: bool):
    """The server a run talks to: ``--url`` (cache on) or ``--url-no-cache`` when given,
    else one started here; yields (base url, process or None)."""
    given = args.url if caching else args.url_no_cache
    if given:
        yield given.rstrip("/"), None
        return
    with started_server(args, caching) as started:
        yield started


def peak_rss_mib(proc: subprocess.Popen | None) -> float | None:
    """The peak resident memory (Linux ``VmHWM``) of the server process and its engine
    process, summed; None for a server not started here."""
    if proc is None:
        return None
    peaks = [_vm_hwm_mib(pid) for pid in [proc.pid, *_children(proc.pid)]]
    peaks = [p for p in peaks if p is not None]
    return sum(peaks) if peaks else None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ clients


_MODELS: dict[str, str] = {}


def _served_model(url: str) -> str:
    if url not in _MODELS:
        listing = httpx.get(url + "/v1/models", timeout=30, trust_env=False).json()
        _MODELS[url] = listing["data"][0]["id"]
    return _MODELS[url]


async def _events(url: str, path: str, body: dict):
    """POST ``body`` with streaming; yield (seconds since sending, parsed event) per event.

    The body is encoded before the clock starts: TTFT is the server's and the wire's.
    """
    async for elapsed, event in post_events(url, path, json.dumps(body).encode()):
        yield elapsed, event


async def chat(url: str, messages: list[dict], max_tokens: int, times: list | None = None):
    """One streamed chat completion: (text, seconds to first token, usage); ``times``
    gets the arrival time of every event that carries text."""
    body = {
        "model": _served_model(url),
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, text, usage = None, "", None
    async for elapsed, chunk in _events(url, "/v1/chat/completions", body):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content") or choice.get("finish_reason"):
                first = first or elapsed
                if times is not None and choice["delta"].get("content"):
                    times.append(elapsed)
                text += choice["delta"].get("content") or ""
    return text, first, usage


async def respond(url: str, input, max_tokens: int, previous: str | None = None):
    """One streamed response: (response id, text, seconds to first token, usage)."""
    body = {"model": _served_model(url), "input": input, "max_output_tokens": max_tokens}
    body.update(temperature=0, stream=True, previous_response_id=previous)
    first, text, final = None, "", None
    async for elapsed, event in _events(url, "/v1/responses", body):
        if event["type"] == "error":
            raise RuntimeError(f"response stream failed: {event}")
        if event["type"] in ("response.output_text.delta", "response.completed"):
            first = first or elapsed
            text += event.get("delta", "")
        if event["type"] == "response.completed":
            final = event["response"]
    return final["id"], text, first, final["usage"]


async def complete(url: str, messages: list[dict], max_tokens: int):
    """One non-streamed chat completion: (text, seconds to the whole answer, usage)."""
    body = {"model": _served_model(url), "messages": messages, "max_tokens": max_tokens}
    body["temperature"] = 0
    seconds, answer = await post_json(url, "/v1/chat/completions", json.dumps(body).encode())
    return answer["choices"][0]["message"]["content"], seconds, answer["usage"]


async def _send_all(url: str, prompts: list[str], max_tokens: int, desc: str, stream: bool):
    bar = tqdm(total=len(prompts), desc=desc, leave=False)

    streams: list[list[float]] = [[] for _ in prompts]

    async def one(text: str, times: list[float]):
        messages = [{"role": "user", "content": text}]
        if stream:
            result = await chat(url, messages, max_tokens, times)
        else:
            result = await complete(url, messages, max_tokens)
        bar.update(1)
        return result

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p, t) for p, t in zip(prompts, streams, strict=True)))
    seconds = time.perf_counter() - start
    bar.close()
    cached = sum(r[2]["prompt_tokens_details"]["cached_tokens"] for r in results)
    prompt = sum(r[2]["prompt_tokens"] for r in results)
    # Once every request decodes, each step gives each stream one token: the gaps
    # between a stream's tokens after the last first token are decode steps.
    last_first = max((t[0] for t in streams if t), default=0.0)
    gaps = [b - a for t in streams for a, b in zip(t, t[1:], strict=False) if a >= last_first]
    info = httpx.get(url + "/v1/cache", timeout=30, trust_env=False).json()
    row = {"seconds": seconds, "prompt_tokens": prompt, "cached": cached}
    row["kv_bytes_per_token"] = info.get("kv_bytes_per_token")
    if stream:
        row["decode_step_ms"] = 1000 * _median(gaps) if gaps else None
    elif decode := _server_decode_ms([r[2] for r in results]):
        row["server_decode_ms"] = decode
    return row


def _server_decode_ms(usages: list[dict]) -> float | None:
    """The median of the server's own decode time per request (first token to last),
    from usage ``timings``; None when the server does not report them."""
    timings = [u.get("timings") for u in usages]
    if not timings or any(t is None for t in timings):
        return None
    return _median([t["total_ms"] - t["ttft_ms"] for t in timings])


# ---------------------------------------------------------------- scenarios


def tgi_long(args: argparse.Namespace, tokenizer) -> tuple[dict, list[dict]]:
    """20 reports at once, twice, with and without prefix caching."""
    reports = [
        synthetic_report(tokenizer, i, args.report_tokens)
        for i in tqdm(range(args.num_reports), desc="reports", leave=False)
    ]
    prompts = [f"Summarize this report: ```{r}```" for r in reports]
    if args.backend != "both":
        rows, peaks = _tgi_rows(args, args.backend, prompts)
        return _tgi_summary(args, rows, peaks), rows
    in_process, _ = _tgi_rows(args, "sdk", prompts)
    rows, peaks = _tgi_rows(args, "http", prompts)
    summary = _tgi_summary(args, rows, peaks)
    summary.update(_tgi_against_in_process(rows, in_process))
    return summary, [{**r, "backend": "http"} for r in rows] + [
        {**r, "backend": "in process"} for r in in_process
    ]


def _tgi_rows(args: argparse.Namespace, backend: str, prompts: list[str]):
    """Each side's two runs through ``backend`` (http or sdk); rows and peak memory."""
    rows, peaks = [], {}
    for name, caching, kv_dtype in _tgi_sides(args.kv_cache_dtype):
        side = argparse.Namespace(**{**vars(args), "kv_cache_dtype": kv_dtype})
        if backend == "sdk":
            results, peaks[name] = sdk_backend.in_own_process(
                side, caching, _sdk_send_twice, prompts, args.max_tokens
            )
            rows += [{"server": name, "run": run, **r} for run, r in enumerate(results, 1)]
            continue
        with server_for(side, caching) as (url, proc):
            for run in (1, 2):
                desc = f"{name} #{run}"
                result = asyncio.run(_send_all(url, prompts, args.max_tokens, desc, args.stream))
                rows.append({"server": name, "run": run, **result})
            peaks[name] = peak_rss_mib(proc)
    return rows, peaks


def _tgi_against_in_process(http: list[dict], in_process: list[dict]) -> dict:
    """The same load over HTTP and in process: second runs (cache on) and what caching
    costs each first run (issue 22's goals: at most 1.3x and 1.05x)."""
    return {
        "second_run_s_in_process": in_process[1]["seconds"],
        "http_vs_in_process_second_run": http[1]["seconds"] / in_process[1]["seconds"],
        "first_run_cache_on_vs_off_http": http[0]["seconds"] / http[2]["seconds"],
        "first_run_cache_on_vs_off_in_process": in_process[0]["seconds"] / in_process[2]["seconds"],
    }


def _tgi_summary(args: argparse.Namespace, rows: list[dict], peaks: dict) -> dict:
    warm, cold = rows[1]["seconds"], rows[3]["seconds"]  # each server's second run
    summary = {
        "benchmark": "long_prompt",
        "scenario": "tgi-long",
        "requests": args.num_reports,
        "prompt_tokens": rows[1]["prompt_tokens"],
        "second_run_s_cache_on": warm,
        "second_run_s_cache_off": cold,
        "speedup": cold / warm,
        "cached_tokens_second_run": rows[1]["cached"],
        "peak_rss_mib": peaks,
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_bytes_per_token": rows[1]["kv_bytes_per_token"],
        "stream": args.stream,
    }
    for key in ("decode_step_ms", "server_decode_ms"):  # whichever the runs measured
        if key in rows[1]:
            summary[f"{key}_cache_on"] = rows[1][key]
    if len(rows) > 4:
        summary.update(_kv_dtype_summary(args, rows[1], rows[5]))
    return summary


def _tgi_sides(kv_cache_dtype: str) -> list[tuple[str, bool, str]]:
    """(name, prefix caching, KV dtype) of each side: cache on and off at the KV dtype
    asked for, and, for a quantized one, cache on at the model's dtype as its baseline."""
    sides = [("prefix cache on", True, kv_cache_dtype), ("prefix cache off", False, kv_cache_dtype)]
    if kv_cache_dtype != "auto":
        sides.append(("prefix cache on, KV auto", True, "auto"))
    return sides


def _kv_dtype_summary(args: argparse.Namespace, quantized: dict, full: dict) -> dict:
    """The quantized cache against the full-precision one, both warm (second runs)."""
    budget = args.kv_memory_budget
    per_token = {args.kv_cache_dtype: quantized["kv_bytes_per_token"]}
    per_token["auto"] = full["kv_bytes_per_token"]
    decode = (quantized.get("decode_step_ms"), full.get("decode_step_ms"))
    return {
        "kv_bytes_per_token_auto": full["kv_bytes_per_token"],
        "kv_bytes_ratio_vs_auto": full["kv_bytes_per_token"] / quantized["kv_bytes_per_token"],
        "kv_memory_budget_bytes": budget,
        "tokens_in_budget": {dtype: budget // n for dtype, n in per_token.items()},
        "second_run_s_kv_auto": full["seconds"],
        "warm_run_speedup_vs_kv_auto": full["seconds"] / quantized["seconds"],
        "decode_step_ms_kv_auto": decode[1],
        "decode_speedup_vs_kv_auto": decode[1] / decode[0] if all(decode) else None,
    }


def _sdk_send_twice(engine, prompts: list[str], max_tokens: int) -> list[dict]:
    """tgi-long on one engine: the load twice (run 1 warms up, run 2 is reported)."""
    return [sdk_backend.send_all(engine, prompts, max_tokens) for _ in (1, 2)]


def conversation(args: argparse.Namespace, tokenizer) -> tuple[dict, list[dict]]:
    """Turn 2 of a conversation over a long context: warm TTFT against cache off.

    Both servers get the same turns: turn 1 (which warms the server up, and on the
    cache-on one fills the cache), then the same turn 2, carrying the cache-on
    server's turn-1 reply, timed.
    """
    context = synthetic_report(tokenizer, 0, args.context_tokens)
    turn1 = [{"role": "user", "content": f"Read this report:\n{context}\nSummarize it."}]
    if args.api == "responses":
        return _responses_conversation(args, turn1, tokenizer)
    if args.backend == "both":
        in_process, _ = _conversation_rows(args, "sdk", turn1)
        summary, rows = _conversation_summary(args, *_conversation_rows(args, "http", turn1))
        summary["turn2_ttft_s_in_process"] = in_process[0]["turn2_ttft_s"]
        summary["http_vs_in_process_turn2"] = (
            rows[0]["turn2_ttft_s"] / in_process[0]["turn2_ttft_s"]
        )
        rows = [{**r, "backend": "http"} for r in rows]
        return summary, rows + [{**r, "backend": "in process"} for r in in_process]
    return _conversation_summary(args, *_conversation_rows(args, args.backend, turn1))


def _conversation_rows(args: argparse.Namespace, backend: str, turn1: list[dict]):
    """Turn 1 then turn 2 through ``backend`` (http or sdk), cache on then off."""
    side_args = argparse.Namespace(**{**vars(args), "backend": backend})
    rows, timings, reply = [], {}, None
    for caching in (True, False):
        name = "prefix cache on" if caching else "prefix cache off"
        side, peak = _chat_side_on(side_args, caching, turn1, reply)
        reply, usage2 = side["reply"], side["usage2"]
        timings[name] = usage2.get("timings")
        rows.append(
            {
                "server": name,
                "turn1_ttft_s": side["turn1_ttft_s"],
                "turn2_ttft_s": side["turn2_ttft_s"],
                "turn2_prompt_tokens": usage2["prompt_tokens"],
                "turn2_cached_tokens": usage2["prompt_tokens_details"]["cached_tokens"],
                "peak_rss_mib": peak,
            }
        )
    return rows, timings


def _conversation_summary(args: argparse.Namespace, rows: list[dict], timings: dict):
    summary = {
        "benchmark": "long_prompt",
        "scenario": "conversation",
        "context_tokens": rows[0]["turn2_prompt_tokens"],
        "turn2_ttft_s_cache_on": rows[0]["turn2_ttft_s"],
        "turn2_ttft_s_cache_off": rows[1]["turn2_ttft_s"],
        "speedup": rows[1]["turn2_ttft_s"] / rows[0]["turn2_ttft_s"],
        "warm_breakdown_ms": timings["prefix cache on"],
        "warm_outside_forward_ms": outside_forward_ms(timings["prefix cache on"]),
    }
    memory = kv_memory(args.model, summary["context_tokens"], args.kv_cache_dtype)
    if memory is not None:
        summary["kv_memory"] = memory
    return summary, rows


def kv_memory(model: str | None, context: int, kv_cache_dtype: str = "auto") -> dict | None:
    """KV bytes per token of one ``context``-token sequence, full cache against hybrid
    (sliding-window layers hold their window, a 2,048-token step and the block being
    written), in bfloat16 or ``kv_cache_dtype``, at ``context``, 128k and 200k tokens;
    None without windows."""
    import torch

    from prefixcache.cache.kv_cache import hybrid_kv_bytes
    from prefixcache.models.config import ModelConfig
    from prefixcache.testing import default_model_path

    config = ModelConfig.from_folder(model or default_model_path())
    if not config.sliding_layers:
        return None
    in_flight = config.sliding_window + 2048 + 16
    report = {"sliding_layers": len(config.sliding_layers), "layers": config.num_layers,
              "window": config.sliding_window,
              "dtype": "bfloat16" if kv_cache_dtype == "auto" else kv_cache_dtype}  # fmt: skip
    for name, tokens in (("context", context), ("128k", 131072), ("200k", 200000)):
        full = hybrid_kv_bytes(config, torch.bfloat16, tokens, tokens, kv_cache_dtype) / tokens
        hybrid = hybrid_kv_bytes(config, torch.bfloat16, tokens, in_flight, kv_cache_dtype)
        hybrid /= tokens
        report[name] = {"tokens": tokens, "full_bytes_per_token": full,
                        "hybrid_bytes_per_token": hybrid, "ratio": full / hybrid}  # fmt: skip
    return report


# Gemma 3's layout in a tiny model: five local layers per global one, 1,024-token window.
TINY_SHAPES = {
    "gemma3_text": {"num_hidden_layers": 6, "sliding_window_pattern": 6, "sliding_window": 1024},
}


def tiny_model(arch: str) -> str:
    """A random-weight tiny model of ``arch`` (built once, under the cache folder)."""
    from prefixcache.testing import cache_home, make_tiny_model

    shape = TINY_SHAPES.get(arch, {})
    return str(make_tiny_model(cache_home() / f"bench-tiny-{arch}", arch, **shape))


QUESTION = "What is the main risk it names?"


def _chat_side(turn, turn1: list[dict], reply: str | None) -> dict:
    """One server's turns: turn 1, then turn 2 after ``reply`` (else turn 1's own).

    ``turn(messages)`` runs one streamed chat turn: (text, seconds to first token, usage).
    """
    own_reply, ttft1, _ = turn(turn1)
    reply = own_reply if reply is None else reply
    turn2 = turn1 + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": QUESTION},
    ]
    _, ttft2, usage2 = turn(turn2)
    return {"reply": reply, "turn1_ttft_s": ttft1, "turn2_ttft_s": ttft2, "usage2": usage2}


def _chat_side_on(args: argparse.Namespace, caching: bool, turn1: list[dict], reply):
    """``_chat_side`` on a server (or, with the SDK, an engine in a process of its own);
    returns it and the peak memory of whatever served it."""
    if args.backend == "sdk":
        return sdk_backend.in_own_process(
            args, caching, _sdk_chat_side, turn1, reply, args.max_tokens
        )
    with server_for(args, caching) as (url, proc):
        side = _chat_side(partial(_chat_now, url, max_tokens=args.max_tokens), turn1, reply)
        return side, peak_rss_mib(proc)


def _sdk_chat_side(engine, turn1: list[dict], reply, max_tokens: int) -> dict:
    turn = partial(sdk_backend.chat_turn, engine, max_tokens=max_tokens)
    return _chat_side(turn, turn1, reply)


def _chat_now(url: str, messages: list[dict], max_tokens: int):
    return asyncio.run(_one_chat(url, messages, max_tokens))


def same_length_questions(tokenizer, count: int) -> list[str]:
    """``count`` distinct short questions that all tokenize to the same length, so every
    measured turn prefills the same number of new tokens."""
    by_length: dict[int, list[str]] = {}
    templates = (
        "What is the main {} it names?",
        "Which {} does it name first?",
        "Where does the {} part begin?",
        "How large is the {} item?",
    )
    for template in templates:
        for word in VOCABULARY:
            question = template.format(word)
            by_length.setdefault(len(tokenizer.encode(question)), []).append(question)
    questions = max(by_length.values(), key=len)
    if len(questions) < count:
        raise ValueError(f"only {len(questions)} same-length questions; ask for fewer rounds")
    return questions[:count]


class _Conversation:
    """One conversation on a server: turn 1 by the Responses API, then warm turn 2s by
    ``previous_response_id`` or as a whole chat completion over the same history."""

    def __init__(self, url: str, turn1: list[dict], questions: list[str], max_tokens: int):
        self.url, self.turn1, self.max_tokens = url, turn1, max_tokens
        self.asked = iter(questions)
        self.turns: dict[str, list] = {"responses": [], "chat": []}

    async def start(self) -> None:
        """Turn 1, then one turn of each kind, unmeasured: it caches the history's reply
        as the template renders it (a random model's reply re-tokenizes differently from
        the ids it generated), so every measured turn prefills only its question."""
        self.rid, reply, self.turn1_ttft_s, _ = await respond(self.url, self.turn1, self.max_tokens)
        self.history = self.turn1 + [{"role": "assistant", "content": reply}]
        await self.by_id(), await self.by_chat()
        self.turns = {"responses": [], "chat": []}

    async def by_id(self) -> None:
        _, _, ttft, usage = await respond(self.url, next(self.asked), self.max_tokens, self.rid)
        self.turns["responses"].append(
            (ttft, _usage_row(usage, "input_tokens", "input_tokens_details"))
        )

    async def by_chat(self) -> None:
        turn2 = self.history + [{"role": "user", "content": next(self.asked)}]
        _, ttft, usage = await chat(self.url, turn2, self.max_tokens)
        row = _usage_row(usage, "prompt_tokens", "prompt_tokens_details")
        self.turns["chat"].append((ttft, row))


async def _warm_rounds(full: _Conversation, base: _Conversation, rounds: int) -> None:
    """Interleaved measured turns, so the long context and the baseline see the same
    machine: by id and by chat on ``full``, by id on ``base``, each round."""
    await full.start()
    await base.start()
    for _ in tqdm(range(rounds), desc="warm turns", leave=False):
        await full.by_id()
        await full.by_chat()
        await base.by_id()


async def _rounds_by_id(conversation: _Conversation, rounds: int) -> None:
    """The same warm-up and measured turns by id as ``_warm_rounds`` gives ``full``."""
    await conversation.start()
    for _ in tqdm(range(rounds), desc="cache-off turns", leave=False):
        await conversation.by_id()


def _usage_row(usage: dict, prompt_key: str, details_key: str) -> dict:
    prompt, cached = usage[prompt_key], usage[details_key]["cached_tokens"]
    return {"prompt": prompt, "cached": cached, "timings": usage.get("timings")}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _warm_summary(turns: list[tuple[float, dict]]) -> dict:
    """Medians over measured turns: TTFT, time outside the forward, new tokens."""
    return {
        "ttft_s": _median([ttft for ttft, _ in turns]),
        "outside_forward_ms": _median([outside_forward_ms(u["timings"]) for _, u in turns]),
        "new_tokens": _median([u["prompt"] - u["cached"] for _, u in turns]),
        "prompt_tokens": turns[0][1]["prompt"],
        "breakdown_ms": turns[len(turns) // 2][1]["timings"],
    }


def _responses_conversation(args: argparse.Namespace, turn1: list[dict], tokenizer):
    """Warm turn 2s by ``previous_response_id`` against chat completions on the same server,
    at the full context and at a small one; and the same turns by id on a cache-off server.

    Both servers get the same warm-up turns and the same number of measured turns, and
    report the same statistic (medians).
    """
    questions = same_length_questions(tokenizer, 2 * args.rounds + 2)
    small = synthetic_report(tokenizer, 1, args.baseline_context_tokens)
    small_turn1 = [{"role": "user", "content": f"Read this report:\n{small}\nSummarize it."}]
    with server_for(args, True) as (url, proc):
        full = _Conversation(url, turn1, questions, args.max_tokens)
        base = _Conversation(url, small_turn1, questions, args.max_tokens)
        asyncio.run(_warm_rounds(full, base, args.rounds))
        peak = peak_rss_mib(proc)
    with server_for(args, False) as (url, proc):
        off = _Conversation(url, turn1, questions, args.max_tokens)
        asyncio.run(_rounds_by_id(off, args.rounds))
        off_peak = peak_rss_mib(proc)
    warm, chat_warm = _warm_summary(full.turns["responses"]), _warm_summary(full.turns["chat"])
    small_warm, cold = _warm_summary(base.turns["responses"]), _warm_summary(off.turns["responses"])
    rows = [
        _response_row("prefix cache on", full.turn1_ttft_s, warm, peak),
        _response_row("prefix cache on, chat completions", None, chat_warm, peak),
        _response_row(f"{args.baseline_context_tokens}-token context", None, small_warm, peak),
        _response_row("prefix cache off", off.turn1_ttft_s, cold, off_peak),
    ]
    summary = {
        "benchmark": "long_prompt",
        "scenario": "conversation",
        "api": "responses",
        "context_tokens": warm["prompt_tokens"],
        "measured_rounds": args.rounds,
        "turn2_ttft_s_cache_on": warm["ttft_s"],
        "turn2_ttft_s_cache_off": cold["ttft_s"],
        "speedup": cold["ttft_s"] / warm["ttft_s"],
        "turn2_new_tokens": warm["new_tokens"],
        "warm_breakdown_ms": warm["breakdown_ms"],
        "warm_outside_forward_ms": warm["outside_forward_ms"],
        "chat_turn2_ttft_s_warm": chat_warm["ttft_s"],
        "chat_turn2_new_tokens": chat_warm["new_tokens"],
        "chat_warm_breakdown_ms": chat_warm["breakdown_ms"],
        "chat_warm_outside_forward_ms": chat_warm["outside_forward_ms"],
        "ttft_vs_chat_warm": warm["ttft_s"] / chat_warm["ttft_s"],
        "baseline_context_tokens": small_warm["prompt_tokens"],
        "baseline_outside_forward_ms": small_warm["outside_forward_ms"],
        "outside_forward_vs_baseline": warm["outside_forward_ms"]
        / small_warm["outside_forward_ms"],
    }
    return summary, rows


def _response_row(server: str, ttft1, warm: dict, peak) -> dict:
    return {
        "server": server,
        "turn1_ttft_s": ttft1,
        "turn2_ttft_s": warm["ttft_s"],
        "turn2_prompt_tokens": warm["prompt_tokens"],
        "turn2_new_tokens": warm["new_tokens"],
        "turn2_outside_forward_ms": warm["outside_forward_ms"],
        "peak_rss_mib": peak,
    }


def outside_forward_ms(timings: dict | None) -> float | None:
    """Time to first token spent outside the model forward: decode, store, tokenize,
    queue and cache lookup (``ttft_ms - prefill_ms``)."""
    return None if timings is None else timings["ttft_ms"] - timings["prefill_ms"]


async def _one_chat(url: str, messages: list[dict], max_tokens: int):
    return await chat(url, messages, max_tokens)


def main(argv: list[str] | None = None) -> None:
    """Run a scenario and report it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["tgi-long", "conversation"], default="tgi-long")
    parser.add_argument(
        "--api",
        choices=["chat", "responses"],
        default="chat",
        help="conversation: send turns as chat completions, or by previous_response_id",
    )
    parser.add_argument("--model", default=None, help="HF folder or hub id (default: tiny)")
    parser.add_argument(
        "--window-kv-cache-tokens",
        type=int,
        default=None,
        help="KV pool of the sliding-window layers (hybrid KV cache), on both sides",
    )
    parser.add_argument(
        "--tiny-arch",
        default=None,
        help="serve a random-weight tiny model of this architecture (e.g. gemma3_text)",
    )
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--num-reports", type=int, default=20)
    parser.add_argument("--report-tokens", type=int, default=10000)
    parser.add_argument("--context-tokens", type=int, default=200000)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--kv-cache-tokens", type=int, default=262144)
    parser.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8", "fp8"],
        default="auto",
        help="KV storage; tgi-long with int8/fp8 also runs a cache-on side at auto, the "
        "baseline for KV bytes per token, warm run time and decode step time",
    )
    parser.add_argument(
        "--kv-memory-budget",
        type=int,
        default=1 << 30,
        help="tgi-long: the byte budget whose token capacity is reported per KV dtype",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=9,
        help="responses: measured warm turns of each API, and of the cache-off server",
    )
    parser.add_argument(
        "--baseline-context-tokens",
        type=int,
        default=2000,
        help="responses: the small context whose time outside the forward is the baseline",
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads of the server (e.g. 1 on a 2-core machine, leaving one core "
        "to this process's clients)",
    )
    parser.add_argument(
        "--backend",
        choices=["both", "http", "sdk"],
        default="both",
        help="http: prefixcache serve (started here, or --url); sdk: the Engine in a child "
        "process, stepped there; both: the same load each way, HTTP against in process",
    )
    parser.add_argument(
        "--engine-in-process",
        action="store_true",
        help="http: servers started here keep the engine on a thread of the server process",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="tgi-long over http: stream every request (SSE) instead of sending it "
        "non-streamed as TGI's load test does (text-generation-inference "
        "load_tests/long.js); the conversation is always streamed (it measures TTFT)",
    )
    parser.add_argument("--url", default=None, help="http: a running server (cache on)")
    parser.add_argument(
        "--url-no-cache", default=None, help="http: a running server with --no-prefix-caching"
    )
    parser.add_argument("--out", default=None, help="folder for JSON, markdown and PNG")
    args = parser.parse_args(argv)
    if args.backend == "both" and args.api == "responses":
        args.backend = "http"  # the Responses API has no in-process counterpart
    if args.backend == "sdk" and args.api == "responses":
        parser.error("--api responses measures the HTTP API: use --backend http")
    if args.backend == "sdk" and (args.url or args.url_no_cache):
        parser.error("--url and --url-no-cache need --backend http")
    if args.tiny_arch and args.model:
        parser.error("--tiny-arch and --model name two models: give one")
    if args.tiny_arch:
        args.model = tiny_model(args.tiny_arch)
    from transformers import AutoTokenizer

    from prefixcache.testing import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(args.model or str(default_model_path()))
    run = tgi_long if args.scenario == "tgi-long" else conversation
    summary, rows = run(args, tokenizer)
    name = f"long_prompt_{args.scenario}"
    if args.scenario == "conversation" and args.api == "responses":
        name += "_responses"  # beside the chat run's report, not over it
    if args.out:
        _chart(Path(args.out), args.scenario, rows, name)
    write_report(args.out, name, summary, rows)


def _chart(folder: Path, scenario: str, rows: list[dict], name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if scenario == "tgi-long":
        labels = [f"{_via(r)}{r['server']}, run {r['run']}" for r in rows]
        values, ylabel = [r["seconds"] for r in rows], "total seconds for all requests"
    else:
        labels = [f"{_via(r)}{r['server']}" for r in rows]
        values, ylabel = [r["turn2_ttft_s"] for r in rows], "turn-2 time to first token (s)"
    bar_chart(folder / f"{name}.png", labels, values, ylabel, scenario, log=True)


def _via(row: dict) -> str:
    return f"{row['backend']}: " if "backend" in row else ""


if __name__ == "__main__":
    main()
