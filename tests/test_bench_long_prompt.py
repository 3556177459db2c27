"""bench/long_prompt.py runs end to end (small sizes, in-process SDK backend)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import long_prompt  # noqa: E402

SMALL = ["--backend", "sdk", "--max-tokens", "4", "--kv-cache-tokens", "16384"]


def _summary(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())["summary"]


def test_tgi_long_second_run_reuses_the_reports(tiny_llama, tmp_path):
    args = ["--scenario", "tgi-long", "--num-reports", "3", "--report-tokens", "400"]
    long_prompt.main(args + SMALL + ["--model", str(tiny_llama), "--out", str(tmp_path)])
    summary = _summary(tmp_path, "long_prompt_tgi-long")
    assert summary["cached_tokens_second_run"] >= summary["prompt_tokens"] - 3 * 16
    assert summary["speedup"] > 0
    assert (tmp_path / "long_prompt_tgi-long.png").exists()


def test_conversation_turn_two_is_served_from_the_cache(tiny_llama, tmp_path):
    args = ["--scenario", "conversation", "--context-tokens", "1500"]
    long_prompt.main(args + SMALL + ["--model", str(tiny_llama), "--out", str(tmp_path)])
    summary = _summary(tmp_path, "long_prompt_conversation")
    assert summary["turn2_ttft_s_cache_on"] > 0 and summary["turn2_ttft_s_cache_off"] > 0
    assert summary["warm_breakdown_ms"]["prefill_ms"] >= 0
    rows = json.loads((tmp_path / "long_prompt_conversation.json").read_text())["rows"]
    assert rows[0]["turn2_cached_tokens"] > 1000 and rows[1]["turn2_cached_tokens"] == 0


def test_responses_needs_the_http_backend(capsys):
    with pytest.raises(SystemExit):
        long_prompt.main(["--backend", "sdk", "--api", "responses"])
    assert "use --backend http" in capsys.readouterr().err
