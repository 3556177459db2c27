"""``prefixcache serve``: flags, the startup banner, and a real server process."""

from __future__ import annotations

import io
import signal
import subprocess

import httpx
import pytest

from prefixcache import Engine, cli
from server.launch import print_banner
from tests.server_harness import serve_subprocess, wait_for_url

SMALL = ["--kv-cache-tokens", "4096", "--max-model-len", "512", "--device", "cpu"]


@pytest.fixture
def captured_serve(monkeypatch, tiny_llama):
    """Replace ``server.launch.serve`` with a recorder of (model, engine options, the
    rest); the default model is tiny_llama."""
    calls = []
    monkeypatch.setattr(
        "server.launch.serve", lambda model, options, **kw: calls.append((model, options, kw))
    )
    monkeypatch.setattr("prefixcache.testing.default_model_path", lambda: tiny_llama)
    return calls


def test_serve_without_model_serves_the_default_and_says_its_weights_are_random(
    captured_serve, capsys, tiny_llama
):
    assert cli.main(["serve", "--port", "0", *SMALL]) == 0
    (model, options, kwargs), = captured_serve  # fmt: skip
    assert kwargs["model_name"] == cli.DEFAULT_SERVED_NAME and kwargs["random_weights"]
    assert "random" in capsys.readouterr().err.lower()
    assert options["max_model_len"] == 512 and model == str(tiny_llama)
    assert not kwargs["engine_in_process"]  # the engine gets its own process by default


def test_serve_passes_engine_and_server_flags_through(captured_serve, tiny_llama, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nkey-from-file\n\nsecond-key\n")
    argv = ["serve", "--model", str(tiny_llama), *SMALL, "--host", "0.0.0.0", "--port", "9999"]
    argv += ["--api-key", "k1", "--api-key", "k2", "--api-keys-file", str(keys_file)]
    argv += ["--max-num-seqs", "3", "--max-queue", "7", "--host-cache-tokens", "1024"]
    argv += ["--log-level", "warning", "--served-model-name", "m"]
    argv += ["--disk-cache-dir", str(tmp_path / "kv"), "--disk-cache-bytes", "5000000"]
    assert cli.main(argv) == 0
    (_, options, kwargs), = captured_serve  # fmt: skip
    assert kwargs["api_keys"] == ["k1", "k2", "key-from-file", "second-key"]
    assert (kwargs["host"], kwargs["port"], kwargs["max_queue"]) == ("0.0.0.0", 9999, 7)
    assert kwargs["model_name"] == "m" and not kwargs["random_weights"]
    assert (options["max_num_seqs"], options["host_cache_tokens"]) == (3, 1024)
    assert (options["disk_cache_dir"], options["disk_cache_bytes"]) == (
        str(tmp_path / "kv"),
        5000000,
    )


def test_serve_can_turn_prefix_caching_off(captured_serve, tiny_llama):
    argv = ["serve", "--model", str(tiny_llama), *SMALL, "--no-prefix-caching"]
    assert cli.main([*argv, "--engine-in-process"]) == 0
    (_, options, kwargs), = captured_serve  # fmt: skip
    assert not options["enable_prefix_caching"] and kwargs["engine_in_process"]


def test_serve_reports_bad_flags_without_a_traceback(captured_serve, tmp_path, capsys):
    assert cli.main(["serve", "--max-queue", "-1", *SMALL]) == 2
    missing = str(tmp_path / "no-such-file")
    assert cli.main(["serve", "--api-keys-file", missing, *SMALL]) == 2
    err = capsys.readouterr().err
    assert "max-queue" in err and "no-such-file" in err and "Traceback" not in err
    assert not captured_serve


def test_banner_shows_url_model_device_backend_and_cache_sizes(tiny_llama):
    engine = Engine.from_pretrained(
        str(tiny_llama), device="cpu", kv_cache_tokens=4096, max_model_len=512
    )
    out = io.StringIO()
    print_banner(engine.limits, "tiny", "127.0.0.1", 8123, 2, random_weights=True, out=out)
    text = out.getvalue()
    for expected in ("http://127.0.0.1:8123/v1", "tiny", "RANDOM", "cpu", "4096 tokens", "512"):
        assert expected in text
    assert engine.core.runner.backend.name in text and "2 API key" in text


def test_generate_command_still_works(tiny_llama, capsys):
    argv = ["generate", "--model", str(tiny_llama), *SMALL, "--max-tokens", "3", "--chat"]
    assert cli.main(argv) == 0
    assert "3 generated" in capsys.readouterr().err


def test_prefixcache_serve_process_answers_until_interrupted(tiny_llama):
    flags = ["--api-key", "secret", "--log-level", "warning"]
    proc, lines = serve_subprocess("--model", str(tiny_llama), *SMALL, *flags)
    try:
        api = wait_for_url(lines, timeout=120)
        with httpx.Client(trust_env=False, timeout=60) as http:
            assert http.get(api.removesuffix("/v1") + "/health").status_code == 200
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert http.post(api + "/chat/completions", json=body).status_code == 401
            headers = {"Authorization": "Bearer secret"}
            reply = http.post(api + "/chat/completions", json=body, headers=headers)
            assert reply.status_code == 200
            assert reply.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
