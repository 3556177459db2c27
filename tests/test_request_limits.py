"""Limits a hostile client runs into: a stalled body times out, ``/metrics`` can need a
key, pin handles never repeat across restarts, and ``405`` names every allowed method."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from prefixcache import cli
from tests.server_harness import running_server
from tests.test_server_cli import SMALL, captured_serve  # noqa: F401 - a fixture

ENGINE = {"max_model_len": 256, "kv_cache_tokens": 2048}


def _http() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30)


def _stalled_post(url: str, path: str) -> bytes:
    """Send the headers and half the body of a POST, then wait for the server's answer."""
    parts = urlsplit(url)
    body = json.dumps({"prompt": "hello", "max_tokens": 1}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body[: len(body) // 2])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_a_stalled_request_body_gets_a_408_error_body(tiny_llama):
    with running_server(str(tiny_llama), engine_options=ENGINE, request_timeout=0.3) as served:
        answer = _stalled_post(served.url, "/v1/completions")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "0.3 s" in error["message"]
        with _http() as http:  # the server goes on serving
            reply = http.post(
                served.api_url + "/completions", json={"prompt": "hi", "max_tokens": 1}
            )
            assert reply.status_code == 200


def test_metrics_need_the_metrics_key_when_one_is_set(tiny_llama):
    options = {"engine_options": ENGINE, "metrics_api_key": "m-key"}
    with running_server(str(tiny_llama), **options) as served, _http() as http:
        assert http.get(served.url + "/metrics").status_code == 401
        wrong = http.get(served.url + "/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = http.get(served.url + "/metrics", headers={"Authorization": "Bearer m-key"})
        assert right.status_code == 200 and "prefixcache_" in right.text


def test_metrics_stay_open_without_a_metrics_key(tiny_llama):
    with running_server(str(tiny_llama), engine_options=ENGINE) as served, _http() as http:
        assert http.get(served.url + "/metrics").status_code == 200


def _pin(served) -> str:
    with _http() as http:
        reply = http.post(
            served.api_url + "/cache/prewarm", json={"prompt": list(range(1, 40)), "pin": True}
        )
    assert reply.status_code == 200, reply.text
    return reply.json()["handle"]


def test_a_pin_handle_from_before_a_restart_cannot_unpin_a_new_pin(tiny_llama):
    with running_server(str(tiny_llama), engine_options=ENGINE) as first:
        old = _pin(first)
    with running_server(str(tiny_llama), engine_options=ENGINE) as second:
        new = _pin(second)
        assert new != old
        with _http() as http:
            assert http.delete(second.api_url + f"/cache/pins/{old}").status_code == 404
            assert http.delete(second.api_url + f"/cache/pins/{new}").status_code == 200


@pytest.mark.parametrize("method", ["OPTIONS", "PUT"])
def test_a_wrong_method_on_a_stored_response_lists_get_and_delete(tiny_llama, method):
    with running_server(str(tiny_llama), engine_options=ENGINE) as served, _http() as http:
        reply = http.request(method, served.api_url + "/responses/resp_" + "0" * 32)
    assert reply.status_code == 405
    allowed = {m.strip() for m in reply.headers["Allow"].split(",")}
    assert {"GET", "DELETE"} <= allowed
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_serve_passes_the_timeouts_and_the_metrics_key_through(captured_serve):  # noqa: F811
    argv = ["serve", *SMALL, "--request-timeout", "7", "--shutdown-timeout", "3"]
    assert cli.main([*argv, "--metrics-api-key", "mk"]) == 0
    ((_, _, kwargs),) = captured_serve
    assert (kwargs["request_timeout"], kwargs["shutdown_timeout"]) == (7.0, 3.0)
    assert kwargs["metrics_api_key"] == "mk"


def test_serve_refuses_timeouts_that_could_never_pass(captured_serve, capsys):  # noqa: F811
    assert cli.main(["serve", *SMALL, "--request-timeout", "0"]) == 2
    assert cli.main(["serve", *SMALL, "--shutdown-timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--request-timeout" in err and "--shutdown-timeout" in err
    assert not captured_serve
