"""A full disk under the Responses store: the reply still reaches the client, the
failure is a server error that says so, nothing half-stored is left behind."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_harness import running_server

from prefixcache.apps.response_store import ResponseNotStored, ResponseStore, StoredResponse

PROMPT = "Tell me about disks that fill up."


def _entry(rid: str, tokens: int = 8) -> StoredResponse:
    return StoredResponse(
        id=rid,
        scope="",
        created_at=0.0,
        messages=[{"role": "user", "content": "hi"}],
        text="hi",
        tokens=np.arange(tokens, dtype=np.int32).tobytes(),
        output_text="hello",
    )


@pytest.fixture
def full_disk(monkeypatch):
    """Every ``Path.write_bytes`` creates its file empty and fails with ENOSPC, as a
    write on a full disk does."""
    calls = []

    def write_bytes(path: Path, data: bytes) -> int:
        calls.append(path)
        path.touch()
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return calls


def test_failed_write_keeps_nothing_and_leaves_no_temporary_file(tmp_path, full_disk):
    store = ResponseStore(folder=tmp_path, clock=lambda: 0.0)
    with pytest.raises(ResponseNotStored) as failed:
        store.put(_entry("resp_a"))
    assert failed.value.disk_full and "disk is full" in str(failed.value)
    assert full_disk, "the store never tried to write"
    assert store.get("resp_a", "") is None and len(store) == 0
    assert list(tmp_path.iterdir()) == []


def test_leftover_temporary_files_are_removed_when_the_store_starts(tmp_path):
    (tmp_path / "resp_old.tmp").write_bytes(b"")
    ResponseStore(folder=tmp_path, clock=lambda: 0.0).put(_entry("resp_kept"))
    ResponseStore(folder=tmp_path, clock=lambda: 0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resp_kept.msgpack"]


def test_full_disk_warnings_are_rate_limited_with_a_count(tmp_path, full_disk, caplog):
    store = ResponseStore(folder=tmp_path, clock=lambda: 0.0)
    caplog.set_level(logging.WARNING, logger="prefixcache.apps.response_store")
    for i in range(50):
        with pytest.raises(ResponseNotStored):
            store.put(_entry(f"resp_{i}"))
    assert len(caplog.records) == 1
    store._warn.last -= 61  # a minute later
    with pytest.raises(ResponseNotStored):
        store.put(_entry("resp_late"))
    assert len(caplog.records) == 2
    assert "49 more" in caplog.records[1].getMessage()


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    store = ResponseStore(folder=tmp_path_factory.mktemp("responses"))
    with running_server(str(tiny_llama), response_store=store) as server:
        yield server, store


def _post(url: str, body: dict) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=60) as http:
        return http.post(url + "/responses", json=body)


def _get_status(url: str, response_id: str) -> int:
    with httpx.Client(trust_env=False, timeout=60) as http:
        return http.get(f"{url}/responses/{response_id}").status_code


def test_full_disk_answers_507_with_the_generated_output(served, full_disk):
    server, store = served
    response = _post(server.api_url, {"input": PROMPT, "max_output_tokens": 8})
    assert response.status_code == 507, response.text
    body = response.json()
    assert body["error"]["code"] == "response_not_stored"
    assert body["error"]["type"] == "server_error"
    generated = body["response"]
    assert generated["store"] is False
    assert generated["error"]["code"] == "response_not_stored"
    assert generated["output"][0]["content"][0]["text"]
    assert generated["usage"]["output_tokens"] > 0
    assert _get_status(server.api_url, generated["id"]) == 404
    assert list(store.folder.iterdir()) == []


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line[:6] == "data: "]


def test_full_disk_mid_stream_ends_with_an_error_and_stores_nothing(served, full_disk):
    server, store = served
    body = {"input": PROMPT, "max_output_tokens": 8, "stream": True}
    response = _post(server.api_url, body)
    assert response.status_code == 200
    events = _events(response)
    kinds = [event["type"] for event in events]
    assert "response.output_text.done" in kinds and "response.completed" not in kinds
    assert kinds[-1] == "error" and events[-1]["code"] == "response_not_stored"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == text
    response_id = events[0]["response"]["id"]
    assert _get_status(server.api_url, response_id) == 404
    assert list(store.folder.iterdir()) == []


def test_with_room_on_the_disk_the_response_is_stored(served):
    server, store = served
    response = _post(server.api_url, {"input": PROMPT, "max_output_tokens": 4})
    assert response.status_code == 200, response.text
    assert _get_status(server.api_url, response.json()["id"]) == 200
    assert not list(store.folder.glob("*.tmp"))
