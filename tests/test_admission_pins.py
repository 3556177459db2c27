"""Admission knows what pins leave of the KV cache.

A pool of 4096 tokens with 2032 of them pinned leaves 2064 (129 blocks) for any one
request that does not share the pinned prefix. A request needing more can never run
while the pin stays: it is refused at once with the numbers, not admitted to stall
the queue or to preempt and re-admit itself forever. One that shares the pinned
prefix only needs room for the rest, and runs.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest
from server_harness import on_engine, running_server

from prefixcache import Engine, SamplingParams
from prefixcache.client import KVCacheBusyError, KVCacheExhaustedError

POOL = 4096
PINNED = 2040  # 2032 tokens (127 blocks) of it are cached and pinned
MAX_STEPS = 200  # a bound on stepping: a request that should be refused must not spin


def _ids(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(count)]


@pytest.fixture
def pinned_engine(tiny_llama) -> tuple[Engine, list[int]]:
    """An engine of ``POOL`` tokens with a ``PINNED``-token prefix pinned."""
    engine = Engine.from_pretrained(str(tiny_llama), device="cpu", kv_cache_tokens=POOL)
    prefix = _ids(PINNED, seed=1)
    assert engine.prewarm(prefix, pin=True).num_cached_tokens == 2032
    return engine, prefix


def _run(engine: Engine, request_id: str) -> list:
    """Step until ``request_id`` finishes (at most ``MAX_STEPS``); its deltas."""
    deltas = []
    for _ in range(MAX_STEPS):
        deltas += [d for d in engine.step() if d.request_id == request_id]
        if deltas and deltas[-1].finish_reason is not None:
            return deltas
    raise AssertionError(f"{request_id} did not finish in {MAX_STEPS} steps")


def test_prompt_longer_than_what_pins_leave_is_refused_at_once(pinned_engine):
    engine, _ = pinned_engine
    with pytest.raises(KVCacheExhaustedError) as refused:
        engine.add_request(_ids(2500, seed=2), SamplingParams(max_tokens=64))
    message = str(refused.value)
    assert "2564 tokens" in message and "2064" in message and "4096" in message
    assert not engine.has_unfinished_requests()  # nothing was queued
    out = engine.generate(_ids(50, seed=3), SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.finish_reason == "length"  # later requests flow
    engine.check_integrity()


def test_long_generation_pins_leave_no_room_for_is_refused_not_spun(pinned_engine):
    engine, _ = pinned_engine
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    with pytest.raises(KVCacheExhaustedError, match="2200 tokens"):
        engine.add_request(_ids(1800, seed=4), params)
    assert engine.stats()["query_tokens"] == PINNED - 1  # the prewarm's lookup only


def test_prompt_extending_the_pinned_prefix_needs_room_only_for_its_rest(pinned_engine):
    engine, prefix = pinned_engine
    prompt = prefix + _ids(1900, seed=5)  # 4004 tokens with max_tokens: fits with the pin
    rid = engine.add_request(prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    deltas = _run(engine, rid)
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_cached_tokens == 2032
    engine.check_integrity()


def test_a_pin_taken_while_a_request_waits_fails_it_at_admission(tiny_llama):
    engine = Engine.from_pretrained(str(tiny_llama), device="cpu", kv_cache_tokens=POOL)
    other = _ids(PINNED, seed=6)
    engine.prewarm(other)  # cached, not pinned yet
    rid = engine.add_request(_ids(2300, seed=7), SamplingParams(max_tokens=64))  # fits now
    engine.control.pin(other, None, None)  # now 127 of the 256 blocks are pinned
    deltas = _run(engine, rid)
    assert deltas[-1].finish_reason == "error"
    assert isinstance(deltas[-1].error, KVCacheExhaustedError)
    assert "2364 tokens" in str(deltas[-1].error)
    assert not engine.has_unfinished_requests()
    engine.check_integrity()


def test_a_request_preempted_past_the_bound_fails_and_the_rest_finish(tiny_llama):
    engine = Engine.from_pretrained(
        str(tiny_llama), device="cpu", kv_cache_tokens=320, max_num_batched_tokens=256
    )
    engine.core.scheduler.max_preemptions = 1  # the first preemption is already too many
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ids = [engine.add_request(_ids(40 + 4 * i, seed=10 + i), params) for i in range(12)]
    finished = {}
    for _ in range(400):
        for delta in engine.step():
            if delta.finish_reason is not None:
                finished[delta.request_id] = delta
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == set(ids)
    failed = [d for d in finished.values() if d.finish_reason == "error"]
    assert failed, "the pool was meant to run dry"
    assert all(isinstance(d.error, KVCacheBusyError) for d in failed)
    assert "preempted 1 times" in str(failed[0].error)
    assert finished[ids[0]].finish_reason == "length"  # the oldest is never preempted
    assert len(failed) < len(ids)
    engine.check_integrity()
    assert engine.core.blocks.cache.num_locked_blocks == 0


# ------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def served(tiny_llama):
    with running_server(str(tiny_llama), engine_options={"kv_cache_tokens": POOL}) as s:
        with httpx.Client(trust_env=False, timeout=120) as http:
            reply = http.post(
                s.url + "/v1/cache/prewarm", json={"prompt": _ids(PINNED, seed=1), "pin": True}
            )
            assert reply.status_code == 200 and reply.json()["pinned"], reply.text
        yield s


@pytest.fixture
def http():
    # The timeout only keeps a regression from hanging the suite.
    with httpx.Client(trust_env=False, timeout=120) as client:
        yield client


@pytest.mark.parametrize(
    ("prompt", "extra", "needed"),
    [
        pytest.param(2500, {"max_tokens": 64}, 2564, id="long-prompt"),
        pytest.param(1800, {"max_tokens": 400, "ignore_eos": True}, 2200, id="long-output"),
    ],
)
def test_http_request_pins_leave_no_room_for_gets_400_and_others_flow(
    served, http, prompt, extra, needed
):
    body = {"model": "tiny", "prompt": _ids(prompt, seed=prompt), **extra}
    reply = http.post(served.api_url + "/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "kv_cache_exhausted" and error["type"] == "invalid_request_error"
    assert f"{needed} tokens" in error["message"] and "2064" in error["message"]
    small = {"model": "tiny", "prompt": _ids(30, seed=9), "max_tokens": 3}
    assert http.post(served.api_url + "/completions", json=small).status_code == 200
    _assert_idle_and_sound(served)


def test_http_stream_pins_leave_no_room_for_ends_with_the_error_and_done(served, http):
    body = {"model": "tiny", "prompt": _ids(2500, seed=11), "max_tokens": 64, "stream": True}
    with http.stream("POST", served.api_url + "/completions", json=body) as response:
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "kv_cache_exhausted"
    _assert_idle_and_sound(served)


def _assert_idle_and_sound(served) -> None:
    """Nothing queued or running (every reply above is complete), no block leaked."""

    def check(engine: Engine) -> None:
        assert not engine.has_unfinished_requests()
        engine.check_integrity()

    on_engine(served.client, check)


def test_a_request_that_must_wait_for_room_does_not_hold_up_smaller_ones(tiny_llama):
    engine = Engine.from_pretrained(
        str(tiny_llama), device="cpu", kv_cache_tokens=1024, max_num_batched_tokens=1024
    )
    first = engine.add_request(_ids(600, seed=20), SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()  # ``first`` holds most of the 64 blocks now, and for 200 more steps
    big = engine.add_request(_ids(700, seed=21), SamplingParams(max_tokens=8))  # fits alone
    small = engine.add_request(_ids(30, seed=22), SamplingParams(max_tokens=4, ignore_eos=True))
    deltas = _run(engine, small)
    assert deltas[-1].finish_reason == "length"
    waiting = {s.request_id for s in engine.core.scheduler.waiting}
    running = {s.request_id for s in engine.core.scheduler.running}
    assert waiting == {big} and running == {first}  # ``big`` waits its turn, not refused
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
