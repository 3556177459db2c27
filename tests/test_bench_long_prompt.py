"""bench/long_prompt.py runs end to end (small sizes, in-process SDK backend)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from server_harness import running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import long_prompt  # noqa: E402

SMALL = ["--backend", "sdk", "--max-tokens", "4", "--kv-cache-tokens", "16384"]


def _report(folder: Path, name: str) -> tuple[dict, list[dict]]:
    report = json.loads((folder / f"{name}.json").read_text())
    return report["summary"], report["rows"]


def test_tgi_long_second_run_reuses_the_reports(tiny_llama, tmp_path):
    args = ["--scenario", "tgi-long", "--num-reports", "3", "--report-tokens", "400"]
    long_prompt.main(args + SMALL + ["--model", str(tiny_llama), "--out", str(tmp_path)])
    summary, rows = _report(tmp_path, "long_prompt_tgi-long")
    runs = {(row["server"], row["run"]): row for row in rows}
    # Both sides warm up with run 1 and are measured on run 2, and nothing else.
    assert sorted(runs) == [(side, run) for side in ("prefix cache off", "prefix cache on")
                            for run in (1, 2)]  # fmt: skip
    on, off = runs["prefix cache on", 2], runs["prefix cache off", 2]
    assert summary["cached_tokens_second_run"] == on["cached"]
    assert on["cached"] >= summary["prompt_tokens"] - 3 * 16 and off["cached"] == 0
    assert summary["speedup"] == pytest.approx(off["seconds"] / on["seconds"])
    assert set(summary["peak_rss_mib"]) == {"prefix cache on", "prefix cache off"}
    assert all(peak > 0 for peak in summary["peak_rss_mib"].values())
    assert (tmp_path / "long_prompt_tgi-long.png").exists()


def test_tgi_long_with_a_quantized_cache_reports_it_against_full_precision(tiny_llama, tmp_path):
    args = ["--scenario", "tgi-long", "--num-reports", "2", "--report-tokens", "300"]
    args += ["--kv-cache-dtype", "int8", "--kv-memory-budget", "1000000"]
    long_prompt.main(args + SMALL + ["--model", str(tiny_llama), "--out", str(tmp_path)])
    summary, rows = _report(tmp_path, "long_prompt_tgi-long")
    sides = {row["server"] for row in rows}
    assert sides == {"prefix cache on", "prefix cache off", "prefix cache on, KV auto"}
    quantized, full = rows[1], rows[5]
    assert (quantized["server"], full["server"]) == ("prefix cache on", "prefix cache on, KV auto")
    assert full["kv_bytes_per_token"] / quantized["kv_bytes_per_token"] >= 3.5
    assert summary["tokens_in_budget"] == {
        "int8": 1000000 // quantized["kv_bytes_per_token"],
        "auto": 1000000 // full["kv_bytes_per_token"],
    }
    assert quantized["decode_step_ms"] > 0 and full["decode_step_ms"] > 0
    assert summary["decode_speedup_vs_kv_auto"] == pytest.approx(
        full["decode_step_ms"] / quantized["decode_step_ms"]
    )
    assert quantized["cached"] >= summary["prompt_tokens"] - 2 * 16


def test_conversation_turn_two_is_served_from_the_cache(tiny_llama, tmp_path):
    args = ["--scenario", "conversation", "--context-tokens", "1500"]
    long_prompt.main(args + SMALL + ["--model", str(tiny_llama), "--out", str(tmp_path)])
    summary, (on, off) = _report(tmp_path, "long_prompt_conversation")
    # Both sides ran turn 1 first, then the same turn 2, which is the one measured.
    assert on["turn1_ttft_s"] is not None and off["turn1_ttft_s"] is not None
    assert on["turn2_prompt_tokens"] == off["turn2_prompt_tokens"] == summary["context_tokens"]
    assert on["turn2_cached_tokens"] > 1000 and off["turn2_cached_tokens"] == 0
    assert summary["speedup"] == pytest.approx(off["turn2_ttft_s"] / on["turn2_ttft_s"])
    # The engine's own stages fit inside the time to first token the caller measured.
    breakdown = summary["warm_breakdown_ms"]
    assert breakdown["prefill_ms"] <= breakdown["ttft_ms"] <= 1000 * on["turn2_ttft_s"]
    assert on["peak_rss_mib"] > 0 and off["peak_rss_mib"] > 0


def test_responses_needs_the_http_backend(capsys):
    with pytest.raises(SystemExit):
        long_prompt.main(["--backend", "sdk", "--api", "responses"])
    assert "use --backend http" in capsys.readouterr().err


def test_conversation_on_a_gemma3_shaped_model_reports_hybrid_kv_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCACHE_HOME", str(tmp_path / "home"))
    args = ["--scenario", "conversation", "--context-tokens", "1300", "--tiny-arch"]
    args += ["gemma3_text", "--window-kv-cache-tokens", "4096"]  # a window and a step
    long_prompt.main(args + SMALL + ["--out", str(tmp_path)])
    summary, (on, off) = _report(tmp_path, "long_prompt_conversation")
    assert on["turn2_cached_tokens"] > 1000 and off["turn2_cached_tokens"] == 0
    memory = summary["kv_memory"]
    assert (memory["sliding_layers"], memory["layers"], memory["window"]) == (5, 6, 1024)
    # Five of six layers hold 1,024 + 2,048 + 16 tokens instead of the whole context.
    at_128k = memory["128k"]
    expected = 6 / (1 + 5 * (1024 + 2048 + 16) / 131072)
    assert at_128k["ratio"] == pytest.approx(expected) and at_128k["ratio"] >= 3
    assert memory["200k"]["ratio"] > at_128k["ratio"]


def test_tgi_long_sets_http_beside_in_process_on_the_same_load(tiny_llama, tmp_path):
    options = {"kv_cache_tokens": 16384}
    with (
        running_server(str(tiny_llama), engine_options=options, engine="process") as on,
        running_server(
            str(tiny_llama), engine_options={**options, "enable_prefix_caching": False}
        ) as off,
    ):
        args = ["--scenario", "tgi-long", "--num-reports", "2", "--report-tokens", "300"]
        args += ["--max-tokens", "4", "--kv-cache-tokens", "16384", "--model", str(tiny_llama)]
        args += ["--url", on.url, "--url-no-cache", off.url, "--out", str(tmp_path)]
        long_prompt.main(args)  # --backend both is the default
    summary, rows = _report(tmp_path, "long_prompt_tgi-long")
    runs = {(row["backend"], row["server"], row["run"]): row for row in rows}
    assert len(runs) == len(rows) == 8  # two runs of each side, each way
    http, local = runs["http", "prefix cache on", 2], runs["in process", "prefix cache on", 2]
    assert http["cached"] == local["cached"] >= summary["prompt_tokens"] - 2 * 16
    assert summary["http_vs_in_process_second_run"] == pytest.approx(
        http["seconds"] / local["seconds"]
    )
    first_on, first_off = runs["http", "prefix cache on", 1], runs["http", "prefix cache off", 1]
    assert summary["first_run_cache_on_vs_off_http"] == pytest.approx(
        first_on["seconds"] / first_off["seconds"]
    )


def test_tgi_long_over_http_sends_non_streamed_requests_unless_asked_to_stream(
    tiny_llama, monkeypatch
):
    prompts = [f"Summarize this report: ```{i} {'fiscal audit ' * 40}```" for i in range(3)]
    options = {"kv_cache_tokens": 8192, "max_model_len": 2048}
    with running_server(str(tiny_llama), engine_options=options) as server:
        # The server asks the engine for the final delta only for a non-streamed request.
        asked, generate = [], server.client.generate
        monkeypatch.setattr(
            server.client,
            "generate",
            lambda *a, **kw: asked.append(kw["final_only"]) or generate(*a, **kw),
        )
        rows = {
            stream: asyncio.run(long_prompt._send_all(server.url, prompts, 4, "t", stream))
            for stream in (False, True)
        }
    # Non-streamed: no token gaps to measure, the server's own decode time instead.
    assert "decode_step_ms" not in rows[False] and rows[False]["server_decode_ms"] > 0
    assert "server_decode_ms" not in rows[True] and rows[True]["decode_step_ms"] > 0
    assert rows[False]["prompt_tokens"] == rows[True]["prompt_tokens"]
    assert rows[True]["cached"] >= rows[True]["prompt_tokens"] - 3 * 16  # sent twice
    assert asked == [True] * 3 + [False] * 3
