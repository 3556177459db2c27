"""bench/concurrency.py: its statistics, and one small run against a real server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import concurrency  # noqa: E402


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert concurrency.percentile(values, 50) == 50.0
    assert concurrency.percentile(values, 99) == 99.0
    assert concurrency.percentile([3.0], 99) == 3.0


def test_goals_compare_sixteen_streams_with_four_and_one():
    rows = [
        {"streams": 1, "requests_per_s": 1.0, "itl_p50_ms": 10.0},
        {"streams": 4, "requests_per_s": 4.0, "itl_p50_ms": 20.0},
        {"streams": 16, "requests_per_s": 3.0, "itl_p50_ms": 30.0},
    ]
    goals = concurrency.goals(rows)
    assert goals["throughput_16_over_4"] == pytest.approx(0.75)
    assert not goals["goal_throughput_16_ge_4"]
    assert goals["itl_p50_16_over_1"] == pytest.approx(3.0) and goals["goal_itl_16_le_3x_1"]


def test_a_small_run_streams_every_turn_of_every_level(tiny_llama, tmp_path):
    sizes = ["--system-tokens", "40", "--context-tokens", "30", "--question-tokens", "8"]
    sizes += ["--max-tokens", "4", "--turns", "2", "--requests-per-stream", "2"]
    sizes += ["--min-requests", "2", "--streams", "1", "2", "--label", "small"]
    concurrency.main([*sizes, "--model", str(tiny_llama), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "concurrency_small.json").read_text())
    rows = {row["streams"]: row for row in report["rows"]}
    assert sorted(rows) == [1, 2]
    assert rows[1]["requests"] >= 2 and rows[2]["requests"] >= 4
    for row in rows.values():
        assert row["output_tokens_per_s"] == pytest.approx(4 * row["requests_per_s"])
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"]
