"""``ProcessEngineClient``: a real engine process against the in-process client.

Every wait on the engine is bounded (``_BOUND_S``) so that a lost message fails a
test instead of hanging it; no wait is a synchronization.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import threading

import httpx
import numpy as np
import pytest
import torch
from server_harness import running_server, wait_until_idle

from prefixcache import Engine
from prefixcache.client import (
    EngineDeadError,
    GrammarError,
    InProcessEngineClient,
    KVCacheBusyError,
    KVCacheExhaustedError,
    ProcessEngineClient,
    RequestDelta,
    RequestFailedError,
    SamplingParams,
    StructuredOutput,
    wire,
)
from prefixcache.client.engine_process import ServedEngineLoop, _Outbox

OPTIONS = {"device": "cpu", "kv_cache_tokens": 8192, "max_model_len": 2048}
_BOUND_S = 120.0  # a bound on any one wait for the engine process, never a synchronization
PROMPTS = [list(range(3, 40)), list(range(3, 30)) + [77] * 300, [5, 6, 7] * 90]
PARAMS = [
    SamplingParams(max_tokens=6, logprobs=True),
    SamplingParams(max_tokens=9, temperature=0.8, seed=7, logprobs=True),
    SamplingParams(max_tokens=5, temperature=1.0, top_k=20, seed=3, logprobs=True),
]


@pytest.fixture(scope="module")
def process_client(tiny_llama):
    client = _start(tiny_llama)
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def thread_client(tiny_llama):
    client = InProcessEngineClient(Engine.from_pretrained(str(tiny_llama), **OPTIONS))
    yield client
    client.shutdown()


def _start(model) -> ProcessEngineClient:
    # As many torch threads as this process uses, so that float sums add up alike.
    return ProcessEngineClient.start(str(model), num_threads=torch.get_num_threads(), **OPTIONS)


def _ids(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


async def _collect(client, tokens, params, request_id=None) -> list:
    async def run() -> list:
        return [d async for d in client.generate(_ids(tokens), params, request_id)]

    return await asyncio.wait_for(run(), _BOUND_S)


def _summary(deltas: list) -> tuple:
    """Everything a front sees of a finished request, timings aside."""
    last = deltas[-1]
    return (
        [t for d in deltas for t in d.token_ids],
        "".join(d.text for d in deltas),
        [p for d in deltas for p in d.logprobs],
        last.finish_reason,
        last.num_prompt_tokens,
        last.num_cached_tokens,
    )


def _turns(client) -> list[tuple]:
    """Each prompt twice (the second time from the prefix cache), each way of sampling."""

    async def run() -> list[tuple]:
        return [
            _summary(await _collect(client, prompt, params))
            for prompt in PROMPTS
            for params in PARAMS[:2]
        ] + [_summary(await _collect(client, PROMPTS[1], PARAMS[2]))]

    return asyncio.run(run())


def test_outputs_and_logprobs_equal_the_in_process_clients(process_client, thread_client):
    expected = _turns(thread_client)
    assert _turns(process_client) == expected
    assert expected[1][5] > 0  # the second turn of a prompt came from the cache


def test_many_concurrent_streams_each_get_their_own_tokens(process_client, thread_client):
    prompts = [[9 + i % 5] + list(range(20, 60 + i)) for i in range(24)]
    params = SamplingParams(max_tokens=7, ignore_eos=True, logprobs=True)

    async def run(client) -> list[tuple]:
        outs = await asyncio.gather(*(_collect(client, p, params) for p in prompts))
        return [_summary(deltas) for deltas in outs]

    got, expected = asyncio.run(run(process_client)), asyncio.run(run(thread_client))
    # Which requests share a step (and a cache hit) depends on when each arrived, and
    # a batch sums its floats in its own order: the ids match, the logprobs closely.
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert np.allclose([g[2] for g in got], [e[2] for e in expected], atol=1e-4)
    wait_until_idle(process_client, _BOUND_S)


def test_leaving_a_stream_early_aborts_it_and_returns_its_blocks(process_client):
    params = SamplingParams(max_tokens=1500, ignore_eos=True)

    async def run():
        seen = 0
        async with contextlib.aclosing(process_client.generate(_ids(range(3, 50)), params)) as s:
            async for _ in s:
                seen += 1
                if seen == 2:
                    break  # and aclosing closes the stream, as the server does
        # The abort went down the pipe before this call, and the engine runs both in
        # order before its next step: the request is gone now, not eventually.
        return await process_client.cache_info()

    info = asyncio.run(asyncio.wait_for(run(), _BOUND_S))
    assert (info.running, info.waiting, info.device.locked) == (0, 0, 0)
    asyncio.run(process_client.check_integrity())


def test_abort_ends_the_stream_with_finish_reason_abort(process_client):
    params = SamplingParams(max_tokens=1500, ignore_eos=True)

    async def run():
        deltas = []
        async for delta in process_client.generate(_ids(range(3, 40)), params, "to-abort"):
            deltas.append(delta)
            if len(deltas) == 1:
                await process_client.abort("to-abort")
        return deltas

    deltas = asyncio.run(asyncio.wait_for(run(), _BOUND_S))
    assert deltas[-1].finish_reason == "abort" and len(deltas) < 1500


def _deltas(deltas: list) -> list[tuple]:
    """Each delta as a front streams it, timings aside."""
    return [(d.token_ids, d.text, d.finish_reason, d.logprobs) for d in deltas]


def _stop_strings(text: str) -> list:
    """Stop strings taken from ``text``: one early, one late (each likely spanning two
    tokens), and one ``text`` never holds beside one it does."""
    early, late = len(text) // 4, 2 * len(text) // 3
    return [text[early : early + 3], text[late : late + 2], ["\x00absent", text[late : late + 4]]]


def test_stop_strings_cut_each_delta_as_the_in_process_engine_does(process_client, thread_client):
    # The engine process sends ids; the front detokenizes and applies the stop strings.
    prompt, free = PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True, logprobs=True)
    text = "".join(d.text for d in asyncio.run(_collect(thread_client, prompt, free)))
    for stop in _stop_strings(text):
        for params in (free, PARAMS[1]):
            params = dataclasses.replace(params, stop=stop, max_tokens=40, ignore_eos=True)
            expected = _deltas(asyncio.run(_collect(thread_client, prompt, params)))
            assert _deltas(asyncio.run(_collect(process_client, prompt, params))) == expected
            if params.greedy:  # the stop string is met before the end, and cut off
                cut = "".join(d[1] for d in expected)
                assert expected[-1][2] == "stop" and len(expected) < 40
                assert text.startswith(cut) and len(cut) < len(text)


def test_a_stop_string_finish_releases_the_request_in_the_engine(process_client, thread_client):
    prompt, endless = PROMPTS[2], SamplingParams(max_tokens=1500, ignore_eos=True)
    first = asyncio.run(_collect(thread_client, prompt, dataclasses.replace(endless, max_tokens=8)))
    stop = "".join(d.text for d in first)[-2:]  # met within 8 tokens, ended there

    async def run():
        deltas = await _collect(process_client, prompt, dataclasses.replace(endless, stop=stop))
        # The front aborted the request before handing over its last delta, so the abort
        # went down the pipe before this call and runs first: gone now, not eventually.
        return deltas, await process_client.cache_info()

    deltas, info = asyncio.run(asyncio.wait_for(run(), _BOUND_S))
    assert deltas[-1].finish_reason == "stop" and len(deltas) <= 8
    assert (info.running, info.waiting, info.device.locked) == (0, 0, 0)
    asyncio.run(process_client.check_integrity())


def test_prewarm_pin_unpin_flush_and_cache_info(process_client, thread_client):
    prefix = _ids([11] * 40 + list(range(100, 400)))

    async def run(client) -> tuple:
        await client.flush()
        warm = await client.prewarm(prefix, pin=True, ttl=600.0)
        pinned = (await client.cache_info()).pins.count
        turn = await _collect(client, list(prefix) + [5, 6], SamplingParams(max_tokens=2))
        unpinned = (await client.unpin(warm.handle), await client.unpin(warm.handle))
        freed = await client.flush()
        after = await client.cache_info()
        return (warm._replace(handle=None, expires_at=None), pinned, turn[-1].num_cached_tokens,
                unpinned, freed > 0, after.device.cached, after.pins.count)  # fmt: skip

    got = asyncio.run(run(process_client))
    assert got == asyncio.run(run(thread_client))
    assert got[1:] == (1, got[0].num_cached_tokens, (True, False), True, 0, 0)
    assert got[0].num_cached_tokens == len(prefix) // 16 * 16


def test_engine_side_errors_keep_their_class_and_message(process_client):
    too_long = SamplingParams(max_tokens=9000)  # past the 8192-token pool: refused there
    with pytest.raises(KVCacheExhaustedError, match="needs KV cache for 9010 tokens") as info:
        asyncio.run(_collect(process_client, range(10), too_long))
    assert (info.value.needed_tokens, info.value.pool_tokens) == (9010, 8192)
    bad_regex = SamplingParams(max_tokens=3, structured=StructuredOutput.regex("a(b"))
    with pytest.raises(GrammarError):
        asyncio.run(_collect(process_client, range(10), bad_regex))
    with pytest.raises(ValueError, match="ttl must be a positive"):
        asyncio.run(process_client.prewarm(_ids(range(10)), pin=True, ttl=-1.0))
    wait_until_idle(process_client, _BOUND_S)  # and the engine goes on, holding nothing


def test_cache_events_reach_a_subscriber(process_client):
    batches = []
    unsubscribe = process_client.subscribe_cache_events(batches.append)
    try:
        asyncio.run(_collect(process_client, [21] * 600, SamplingParams(max_tokens=1)))
    finally:
        unsubscribe()
    # A step's events are sent before its deltas, so they are in by the last delta.
    stored = [e for batch in batches for e in batch if e.kind == "stored"]
    assert sum(len(e.chunk_hashes) for e in stored) == 600 // 256


def test_a_model_that_fails_to_load_raises_its_error_and_leaves_no_process(tmp_path):
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ProcessEngineClient.start(str(tmp_path / "missing"), device="cpu")
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_killed_engine_fails_pending_and_later_requests_and_the_server_answers_503(tiny_llama):
    with running_server(str(tiny_llama), engine_options=OPTIONS, engine="process") as server:
        client = server.client

        async def pending_stream() -> None:
            params = SamplingParams(max_tokens=1500, ignore_eos=True)
            async for _ in client.generate(_ids(range(3, 40)), params):
                os.kill(client.pid, signal.SIGKILL)  # mid-stream, after its first token

        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(pending_stream(), _BOUND_S))
        assert not client.is_alive
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(client, range(10), SamplingParams(max_tokens=2)))
        with pytest.raises(EngineDeadError):
            asyncio.run(client.cache_info())
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(trust_env=False, timeout=_BOUND_S) as http:
            reply = http.post(server.api_url + "/chat/completions", json=body)
        assert reply.status_code == 503


def test_shutdown_stops_the_engine_process(tiny_llama):
    client = _start(tiny_llama)
    pid = client.pid
    assert client.is_alive
    client.shutdown()
    assert not client.is_alive
    with pytest.raises(ProcessLookupError):  # exited and reaped: no orphan, no zombie
        os.kill(pid, 0)
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(client, range(10), SamplingParams(max_tokens=2)))


@pytest.mark.parametrize(
    "error",
    [
        RequestFailedError("the engine failed while running this request"),
        KVCacheBusyError(4),
        KVCacheExhaustedError(9010, 8000, 8192),
        ValueError("request id 'x' is already in use"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_delta_crosses_the_pipe_with_its_class_message_and_attributes(error):
    delta = RequestDelta("r", [], "", "error", 5, 0, error=error)
    data = wire.encoder.encode(wire.Deltas([wire.encode_delta(delta)]))
    (crossed,) = wire.to_front.decode(data).deltas
    back = wire.decode_delta(crossed).error
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)


def test_an_unknown_error_class_arrives_as_a_runtime_error_naming_it():
    back = wire.decode_error(wire.encode_error(ZeroDivisionError("division by zero")))
    assert type(back) is RuntimeError and str(back) == "ZeroDivisionError: division by zero"


async def _final_only(client, tokens, params) -> list:
    async def run() -> list:
        return [d async for d in client.generate(_ids(tokens), params, final_only=True)]

    return await asyncio.wait_for(run(), _BOUND_S)


def _final_only_cases(text: str) -> list[SamplingParams]:
    """Logprobs (greedy and sampled), a stop string met mid-reply, and a reply cut by
    max_tokens."""
    cut = SamplingParams(max_tokens=11, ignore_eos=True, logprobs=True)
    stop = dataclasses.replace(cut, max_tokens=40, stop=text[len(text) // 3 :][:3])
    return [PARAMS[0], PARAMS[1], stop, dataclasses.replace(stop, temperature=0.8, seed=5), cut]


def test_a_final_only_request_gets_one_delta_equal_to_its_deltas_added_up(
    process_client, thread_client
):
    prompt, free = PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True)
    text = "".join(d.text for d in asyncio.run(_collect(thread_client, prompt, free)))
    asyncio.run(_collect(process_client, prompt, free))  # both engines cache the prompt
    for params in _final_only_cases(text):
        streamed = _summary(asyncio.run(_collect(thread_client, prompt, params)))
        for client in (thread_client, process_client):
            (final,) = asyncio.run(_final_only(client, prompt, params))
            assert _summary([final]) == streamed, (params, client)
            assert final.timings is not None
        if params.stop and params.greedy:  # the stop string is met and cut off
            assert streamed[3] == "stop" and len(streamed[1]) < len(text)
    assert streamed[3] == "length" and len(streamed[0]) == 11  # the last case: cut


def test_a_stop_string_ends_a_final_only_request_in_the_engine_at_once(process_client):
    prompt, endless = PROMPTS[2], SamplingParams(max_tokens=300, ignore_eos=True)
    first = asyncio.run(
        _collect(process_client, prompt, dataclasses.replace(endless, max_tokens=8))
    )
    stop = "".join(d.text for d in first)[-2:]  # met within 8 tokens

    async def run():
        await process_client.flush()
        deltas = await _final_only(process_client, prompt, dataclasses.replace(endless, stop=stop))
        return deltas, await process_client.cache_info()

    (final,), info = asyncio.run(asyncio.wait_for(run(), _BOUND_S))
    assert final.finish_reason == "stop" and len(final.token_ids) <= 8
    # Aborted where the stop string completed: the cache holds the prompt and at most
    # those 8 tokens, not the 300 the request would have run to.
    assert info.device.cached * 16 <= len(prompt) + 8 + 16
    assert (info.running, info.waiting, info.device.locked) == (0, 0, 0)


@pytest.mark.parametrize("final_only", [True, False])
def test_the_engine_process_sends_a_final_only_request_in_one_message(tiny_llama, final_only):
    front, child = multiprocessing.Pipe()
    loop = ServedEngineLoop(Engine.from_pretrained(str(tiny_llama), **OPTIONS), _Outbox(child))
    threading.Thread(target=loop.run, daemon=True).start()  # the engine process's main thread
    try:
        params = SamplingParams(max_tokens=7, ignore_eos=True, logprobs=True)
        loop.add(wire.Add("r", wire.prompt_bytes(_ids(PROMPTS[0])), params, None, final_only))
        messages = []
        while not messages or messages[-1][-1].finish_reason is None:
            assert front.poll(_BOUND_S)
            messages.append(wire.to_front.decode(front.recv_bytes()).deltas)
    finally:
        loop.shutdown()
    ids = [t for deltas in messages for d in deltas for t in d.token_ids]
    assert len(ids) == 7 and len(messages) == (1 if final_only else 7)
    assert len(messages[-1][-1].logprobs) == (7 if final_only else 1)
    assert loop._finals == {}  # the folded request leaves nothing behind
