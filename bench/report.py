"""Shared output for benchmarks: JSON file, markdown table, PNG chart, one-line summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub markdown table of ``rows``: a column per key of any row, in the order
    first met; a row without a key has an empty cell there (a figure not measured)."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k]) if k in row else "" for k in keys) + " |")
    return "\n".join(lines)


def bar_chart(
    path: Path,
    labels: Sequence[str],
    values: Sequence[float],
    ylabel: str,
    title: str,
    log: bool = False,
):
    """Save a simple bar chart as PNG (skipped quietly if matplotlib is missing);
    ``log`` for values that span orders of magnitude (milliseconds beside minutes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([label.replace(", ", ",\n") for label in labels], values, color="#4472c4")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | None, name: str, summary: dict, rows: Sequence[dict]) -> None:
    """Print the table, write ``name.json``/``name.md`` under ``out_dir``, print summary last."""
    table = markdown_table(rows)
    print(table)
    if out_dir:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(
            json.dumps({"summary": summary, "rows": rows}, indent=2)
        )
        (folder / f"{name}.md").write_text(table + "\n")
    print(json.dumps(summary))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
