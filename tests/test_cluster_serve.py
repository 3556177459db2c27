"""Two engine replicas on a local Ray instance behind the OpenAI-compatible ingress.

One Ray instance (2 CPUs) and one deployment serve the whole module; the test that
kills a replica runs last. Requests go over real HTTP through Serve's proxy on
127.0.0.1 with the official ``openai`` client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from redis_server import RedisServer, require_redis  # noqa: E402
from server_harness import running_server  # noqa: E402

from prefixcache.cluster.app import ClusterOptions  # noqa: E402
from prefixcache.cluster.launch import deploy  # noqa: E402
from prefixcache.cluster.registry import router_for  # noqa: E402
from prefixcache.sampling_params import SamplingParams  # noqa: E402

APP = "prefixcache-test"
BLOCK = 16
ENGINE = {"chunk_size": 32, "max_model_len": 2048}


class Cluster(NamedTuple):
    url: str
    replicas: Any  # the replica deployment's handle (routed by PrefixAffinityRouter)
    ingress: Any  # the ingress deployment's handle
    app: str = APP

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw
        )

    def replica_ids(self) -> list[str]:
        self.replicas.whoami.remote().result()  # makes this process's router learn them
        return router_for("EngineReplica", self.app).replica_ids()

    def on(self, replica: str, method: str, *args, **kwargs) -> Any:
        return getattr(self.replicas, method).remote(*args, replica=replica, **kwargs).result()

    def query_tokens(self) -> dict[str, int]:
        return {r: self.on(r, "cache_info").query_tokens for r in self.replica_ids()}

    def routing(self) -> dict:
        return self.ingress.routing_info.remote().result()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_llama) -> Iterator[Cluster]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        replicas = deploy(
            {"model": str(tiny_llama), "device": "cpu", **ENGINE},
            model_name="tiny",
            cluster=ClusterOptions(num_replicas=2, replica_cpus=0.5),
            host="127.0.0.1",
            port=port,
            app_name=APP,
        )
        ingress = serve.get_deployment_handle("Ingress", app_name=APP)
        yield Cluster(f"http://127.0.0.1:{port}", replicas, ingress)
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)  # polling interval
    return value


def _first_message(i: int) -> str:
    return f"Conversation {i}: " + " ".join(f"fact{i}-{k} is about topic {k}" for k in range(20))


def _run_conversation(client: openai.OpenAI, i: int, turns: int = 3) -> list[tuple]:
    """(prompt_tokens, cached_tokens, reply) per turn; a conversation runs in order."""
    messages = [{"role": "user", "content": _first_message(i)}]
    results = []
    for turn in range(turns):
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0
        )
        usage, text = reply.usage, reply.choices[0].message.content
        results.append((usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, text))
        messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": f"And turn {turn + 1} of conversation {i}?"},
        ]
    return results


def test_every_later_turn_lands_on_the_replica_holding_its_prefix(cluster, tiny_llama):
    before = cluster.query_tokens()
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda i: _run_conversation(cluster.openai(), i), range(20)))
    for turns in runs:
        for (prev_prompt, _, _), (_, cached, _) in zip(turns, turns[1:], strict=False):
            assert cached >= prev_prompt // BLOCK * BLOCK
    after = cluster.query_tokens()
    assert all(after[r] > before[r] for r in after), "both replicas served conversations"
    with running_server(
        str(tiny_llama), engine_options={**ENGINE, "enable_prefix_caching": False}
    ) as single:
        client = openai.OpenAI(base_url=single.api_url, api_key="unused", max_retries=0)
        for i in (0, 7, 19):
            reference = _run_conversation(client, i)
            assert [t[2] for t in reference] == [t[2] for t in runs[i]]
            assert [t[0] for t in reference] == [t[0] for t in runs[i]]
            assert all(t[1] == 0 for t in reference)


def test_another_tenant_never_hits_a_conversations_prefix(cluster):
    client = cluster.openai()
    messages = [{"role": "user", "content": _first_message(100)}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    other = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, extra_body={"cache_salt": "other"}
    )
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 2
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def _served_by(cluster: Cluster, fn: Callable[[], Any]) -> tuple[str, Any]:
    before = cluster.query_tokens()
    result = fn()
    after = cluster.query_tokens()
    (replica,) = [r for r in after if after[r] > before[r]]
    return replica, result


def test_a_replica_that_evicted_a_conversation_stops_attracting_it(cluster):
    client = cluster.openai()
    messages = [{"role": "user", "content": _first_message(200)}]

    def ask():
        return client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=4, temperature=0
        )

    holder, first = _served_by(cluster, ask)
    assert _served_by(cluster, ask)[0] == holder  # affinity: the holder again
    other = next(r for r in cluster.replica_ids() if r != holder)
    # The other replica computes the first 64 prompt tokens (two chunks) only.
    prompt = _chat_ids(cluster, messages)
    held_before = cluster.routing()["held_chains"][other]  # earlier tests' chains
    cluster.on(other, "prewarm", prompt_ids=prompt[:64])
    cluster.on(holder, "flush")
    # The ingress's router hears of both through the replicas' routing stats.
    _wait_for(lambda: cluster.routing()["held_chains"][holder] == 0)
    _wait_for(lambda: cluster.routing()["held_chains"][other] >= held_before + 2)
    replica, reply = _served_by(cluster, ask)
    assert replica == other
    assert reply.usage.prompt_tokens_details.cached_tokens == 64
    assert reply.choices[0].message.content == first.choices[0].message.content


def _chat_ids(cluster: Cluster, messages: list[dict]):
    """The prompt ids the ingress makes of ``messages`` (same tokenizer and template)."""
    from prefixcache.client import InputProcessor
    from prefixcache.inputs.tokenizer import load_tokenizer

    limits = cluster.replicas.limits.remote().result()
    return InputProcessor(load_tokenizer(Path(limits.model)), limits).chat_tokens(messages)


def test_the_ingress_serves_the_whole_app(cluster):
    with httpx.Client(base_url=cluster.url, trust_env=False, timeout=60) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"
        bad = http.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        info = http.get("/v1/cache").json()
        metrics = http.get("/metrics").text
    stream = cluster.openai().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason is not None
    assert "prefixcache_prompt_tokens_total" in metrics
    total = sum(cluster.on(r, "cache_info").device.total for r in cluster.replica_ids())
    assert total > 0 and str(total) in str(info)


def _collect(stream) -> tuple[list[int], str, int]:
    """Token ids, text and cached prompt tokens of a replica's delta stream."""
    ids, text, cached = [], "", 0
    for delta in stream:
        ids += delta.token_ids
        text += delta.text
        cached = delta.num_cached_tokens
    return ids, text, cached


def _redis_hits(cluster: Cluster, replica: str) -> int:
    tiers = cluster.on(replica, "cache_info").tiers
    return next(t.hit_tokens for t in tiers if t.name == "redis")


def test_a_prefix_computed_on_one_replica_is_reused_by_another_through_redis(cluster, tiny_llama):
    """A second application on the same Ray instance, its replicas sharing a Redis."""
    require_redis()
    redis = RedisServer().start()
    app = "prefixcache-redis"
    try:
        handle = deploy(
            {"model": str(tiny_llama), "device": "cpu", "kv_store": redis.url, **ENGINE},
            model_name="tiny",
            cluster=ClusterOptions(num_replicas=2, replica_cpus=0.25),
            host="127.0.0.1",
            port=0,
            app_name=app,
            route_prefix="/redis",
        )
        shared = Cluster(cluster.url + "/redis", handle, None, app)
        client = shared.openai()
        messages = [{"role": "user", "content": _first_message(400)}]
        first = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0
        )
        prompt = _chat_ids(shared, messages)
        num_chunks = len(prompt) // ENGINE["chunk_size"]
        # Written behind the request: wait until every full prompt chunk is in Redis.
        _wait_for(lambda: len(redis.client().keys("prefixcache:kv:*")) >= num_chunks)
        holder = next(r for r in shared.replica_ids() if shared.on(r, "cache_info").query_tokens)
        other = next(r for r in shared.replica_ids() if r != holder)
        params = SamplingParams(max_tokens=8, temperature=0.0)
        stream = handle.options(stream=True).generate.remote(
            prompt_ids=prompt, params=params, replica=other
        )
        ids, text, cached = _collect(stream)
        assert cached >= num_chunks * ENGINE["chunk_size"]
        assert _redis_hits(shared, other) >= num_chunks * ENGINE["chunk_size"]
        assert text == first.choices[0].message.content and len(ids) == 8
    finally:
        serve.delete(app)
        redis.stop()


def _stream_until_done(client: openai.OpenAI, i: int, started: threading.Event) -> str:
    """Stream a long reply; 'ok' if it finished, else the error's message."""
    try:
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": _first_message(300 + i)}],
            max_tokens=1500,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
        return "ok"
    except openai.APIError as exc:
        return str(exc)


def test_a_killed_replicas_requests_fail_clearly_and_the_survivor_serves(cluster):
    """Runs last: it kills a replica (Serve replaces it later)."""
    client = cluster.openai()
    replicas = cluster.replica_ids()
    names = {r: cluster.on(r, "whoami")[1] for r in replicas}
    events = [threading.Event() for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_stream_until_done, client, i, e) for i, e in enumerate(events)]
        _wait_for(lambda: all(cluster.on(r, "cache_info").running for r in replicas))
        _wait_for(lambda: all(e.is_set() for e in events))
        victim = replicas[0]
        ray.kill(ray.get_actor(names[victim], namespace="serve"), no_restart=True)
        outcomes = [f.result() for f in futures]
    failed = [o for o in outcomes if o != "ok"]
    assert failed and len(failed) < len(outcomes)
    assert all("was lost" in o and "retry" in o for o in failed)
    after = [
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"after {i}"}], max_tokens=3
        )
        for i in range(6)
    ]
    assert all(r.choices[0].finish_reason for r in after)
