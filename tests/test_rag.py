"""The RAG pipeline, run by the same code against an in-process engine and a live server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_harness import on_engine, running_server

from prefixcache import Engine, SamplingParams
from prefixcache.apps.rag import Document, RagPipeline

BLOCK = 16
KEY = "rag-key"
ENGINE_OPTIONS = {"kv_cache_tokens": 1024, "max_model_len": 1024, "max_pinned_tokens": 384}
PARAMS = SamplingParams(max_tokens=2)
DOCS = [
    Document("cats", "Cats sleep most of the day and hunt small animals at night. " * 3),
    Document("dogs", "Dogs bark at strangers and like to fetch sticks in the park. " * 3),
    Document("tides", "Tides rise and fall twice a day because the moon pulls the sea. " * 3),
]


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 600 + 3 for i in range(n)]


def _floor(n: int) -> int:
    return n // BLOCK * BLOCK


class Target:
    """Where a pipeline runs, and how a test reaches the engine behind it."""

    def __init__(self, engine: Engine | None = None, server=None) -> None:
        self.engine, self.server = engine, server

    def pipeline(self, **kwargs) -> RagPipeline:
        if self.server is not None:
            return RagPipeline(self.server.url, api_key=KEY, **kwargs)
        return RagPipeline(self.engine, **kwargs)

    def run(self, fn):
        """``fn(engine)`` where the engine lives (its loop thread for a server)."""
        if self.server is not None:
            return on_engine(self.server.client, fn)
        return fn(self.engine)

    def traffic(self, seeds) -> None:
        """Unrelated requests, each filling most of the KV pool."""
        for seed in seeds:
            if self.server is None:
                self.engine.generate(_prompt(seed, 800), PARAMS)
                continue
            body = {"prompt": _prompt(seed, 800), "max_tokens": 1}
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(trust_env=False, timeout=60, headers=headers) as http:
                http.post(self.server.url + "/v1/completions", json=body).raise_for_status()


@pytest.fixture(scope="module")
def local_engine(tiny_llama):
    return Engine.from_pretrained(str(tiny_llama), device="cpu", **ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def live_server(tiny_llama):
    with running_server(str(tiny_llama), engine_options=ENGINE_OPTIONS, api_keys=(KEY,)) as s:
        yield s


@pytest.fixture(params=["engine", "server"])
def target(request) -> Target:
    if request.param == "engine":
        target = Target(engine=request.getfixturevalue("local_engine"))
    else:
        target = Target(server=request.getfixturevalue("live_server"))
    target.run(_reset)
    return target


def _reset(engine: Engine) -> None:
    engine.control.pins.clear()
    engine.control.pins.clock = time.monotonic
    engine.flush_cache()


def _pick(*ids):
    return lambda question, documents, k: list(ids)[:k]


def _locked(target: Target) -> int:
    return target.run(lambda e: e.stats()["locked_blocks"])


def test_query_reuses_system_prompt_and_first_document(target):
    with target.pipeline() as rag:
        handles = rag.add_documents(DOCS)
        answer = rag.query("Why do tides rise twice a day?", top_k=2, params=PARAMS)
    assert answer.documents[0] in {"cats", "dogs", "tides"} and len(answer.documents) == 2
    first = [d.id for d in DOCS].index(answer.documents[0])
    assert answer.num_cached_tokens >= _floor(handles[first].num_tokens)
    assert answer.text


def test_default_bm25_retriever_finds_the_matching_document(target):
    with target.pipeline() as rag:
        rag.add_documents(DOCS)
        answer = rag.query("when does the moon pull the sea", top_k=1, params=PARAMS)
    assert answer.documents == ["tides"]


def test_same_documents_give_the_same_prefix_in_any_retrieved_order(target):
    with target.pipeline(retriever=_pick("tides", "cats")) as rag:
        rag.add_documents(DOCS)
        first = rag.query("q one", top_k=2, params=PARAMS)
        rag.retriever = _pick("cats", "tides")
        second = rag.query("q two", top_k=2, params=PARAMS)
    assert first.documents == second.documents == ["cats", "tides"]
    # The first query cached both documents after the system prompt; the second reuses them.
    assert second.num_cached_tokens > first.num_cached_tokens


def test_stream_query_yields_the_same_text_as_query(target):
    with target.pipeline(retriever=_pick("dogs")) as rag:
        rag.add_documents(DOCS)
        streamed = list(rag.stream_query("Do dogs bark?", top_k=1, params=PARAMS))
        answer = rag.query("Do dogs bark?", top_k=1, params=PARAMS)
    assert streamed and "".join(streamed) == answer.text


def test_pinned_documents_survive_unrelated_traffic_unpinned_do_not(target):
    with target.pipeline() as rag:
        pinned = rag.add_documents(DOCS[:1], pin=True)[0]
        loose = rag.add_documents(DOCS[1:2])[0]
        target.traffic(range(3))
        rag.retriever = _pick("cats")
        kept = rag.query("cats?", top_k=1, params=PARAMS)
        rag.retriever = _pick("dogs")
        lost = rag.query("dogs?", top_k=1, params=PARAMS)
    assert pinned.pinned and kept.num_cached_tokens >= _floor(pinned.num_tokens)
    assert lost.num_cached_tokens < loose.num_cached_tokens


def test_remove_documents_unpins_and_forgets(target):
    with target.pipeline() as rag:
        rag.add_documents(DOCS[:2], pin=True)
        assert _locked(target) > 0
        rag.remove_documents(["cats", "dogs"])
        assert _locked(target) == 0 and rag.documents == []
        with pytest.raises(ValueError, match="unknown document ids"):
            rag.remove_documents(["cats"])


def test_ttl_expiry_makes_documents_evictable(target):
    now = [1000.0]

    def fake_clock(engine):
        engine.control.pins.clock = lambda: now[0]

    target.run(fake_clock)
    with target.pipeline() as rag:
        rag.add_documents(DOCS[:1], pin=True, ttl=5.0)
        assert _locked(target) > 0
        now[0] += 6.0
        target.traffic([7])  # any engine step expires due pins; this also evicts
        assert _locked(target) == 0


def test_pin_cap_is_refused_with_a_clear_error(target):
    long_doc = Document("long", "A very long document about nothing in particular. " * 20)
    with target.pipeline() as rag:
        with pytest.raises(ValueError, match="pinned-token cap"):
            rag.add_documents([long_doc], pin=True)
        assert rag.documents == []
    assert _locked(target) == 0


def test_flush_keeps_the_blocks_a_running_request_holds(tiny_llama):
    engine = Engine.from_pretrained(
        str(tiny_llama), device="cpu", kv_cache_tokens=1024, max_num_batched_tokens=32
    )
    engine.prewarm(_prompt(8, 64))
    running = _prompt(9, 100)
    engine.add_request(running, PARAMS)
    engine.step()  # a first 32-token chunk of prefill: cached, locked by the request
    assert engine.flush_cache() == 4
    assert (
        engine.core.blocks.cache.peek(running) == 32
        and engine.core.blocks.cache.peek(_prompt(8, 64)) == 0
    )
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()


def test_bad_input_is_refused_before_any_work():
    rag = RagPipeline(_NoBackendEngine(), retriever=_pick("a"))
    rag.add_documents([Document("a", "text")])
    with pytest.raises(ValueError, match="already in use"):
        rag.add_documents([Document("a", "again")])
    with pytest.raises(ValueError, match="question"):
        rag.compose("  ")
    rag.retriever = _pick("nope")
    with pytest.raises(ValueError, match="unknown document ids"):
        rag.compose("q")
    with pytest.raises(ValueError, match="template"):
        RagPipeline(_NoBackendEngine(), template="{missing}").add_documents(["x"])


class _NoBackendEngine:
    """Enough of an Engine for input checks: pre-warm does nothing."""

    def prewarm(self, messages, pin=False, ttl=None, salt=None):
        from prefixcache.cache.pins import PinHandle

        return PinHandle(None, 0, 0, False)

    def step(self):
        return []


def test_quickstart_shows_reuse(tiny_llama):
    script = Path(__file__).parents[1] / "examples" / "rag_quickstart.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model", str(tiny_llama)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    queries = [line for line in result.stdout.splitlines() if line.startswith("query")]
    assert len(queries) >= 2
    for line in queries[1:]:
        cached = int(line.split("cached tokens ")[1].split(",")[0])
        assert cached > 0
