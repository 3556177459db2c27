"""``InProcessEngineClient.start``: the engine is loaded and stepped on one thread (a
second thread stepping an engine loaded elsewhere ran each CPU decode step ~30% slower:
two OpenMP pools, docs/perf/http_path.md)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from prefixcache import SamplingParams
from prefixcache.client import InProcessEngineClient
from prefixcache.engine.model_runner import ModelRunner
from prefixcache.sdk import Engine


def test_a_started_client_loads_and_steps_its_engine_on_one_other_thread(tiny_llama, monkeypatch):
    loaded_on, stepped_on = [], set()
    from_pretrained, run = Engine.from_pretrained.__func__, ModelRunner.run

    def loading(cls, *args, **kwargs):
        loaded_on.append(threading.get_ident())
        return from_pretrained(cls, *args, **kwargs)

    def stepping(self, *args, **kwargs):
        stepped_on.add(threading.get_ident())
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(loading))
    monkeypatch.setattr(ModelRunner, "run", stepping)
    client = InProcessEngineClient.start(str(tiny_llama), device="cpu", dtype="float32")
    try:

        async def answer():
            ids = np.arange(3, 40, dtype=np.int32)
            return [d async for d in client.generate(ids, SamplingParams(max_tokens=4))]

        deltas = asyncio.run(answer())
    finally:
        client.shutdown()
    assert sum(len(d.token_ids) for d in deltas) == 4
    assert stepped_on == set(loaded_on) and threading.get_ident() not in stepped_on


def test_a_start_that_cannot_load_raises_what_loading_raised(tmp_path):
    with pytest.raises(Exception) as started:
        InProcessEngineClient.start(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(type(started.value)):
        Engine.from_pretrained(str(tmp_path / "missing"), device="cpu")
