"""Ours against llama.cpp on the same weights and token ids, in one process.

The 20M-parameter Qwen2-shaped float32 model with random weights (8 layers, hidden
512, 8 query / 2 KV heads of 64) is built with ``prefixcache.testing.make_tiny_model``
and written as GGUF (``bench/gguf_export.py``, with the ``gguf`` package) for
llama-cpp-python. Then, with the same thread count on both sides:

- cold: prefill of the ``--context-tokens`` ids from an empty cache;
- warm turn 2: ``--new-tokens`` new ids over the cached context (ours: a prefix-cache
  hit through ``Engine.generate``; llama.cpp: its KV kept up to the context, the new
  ids evaluated on top), different new ids each round, the rounds of the three sides
  interleaved so load on the machine falls on all of them alike;
- fairness: greedy tokens after a warm turn-2 prompt and the logits they were chosen
  from, ours (from the cache) against llama.cpp's (same ids in, same ids out, or the
  comparison is void).

llama.cpp runs with flash attention off and on, with its default KV cache (float16)
and, flash attention off, with a float32 KV cache like ours. Ratios are ours /
llama.cpp.

    pip install 'prefixcache[llamacpp]'   # compiles llama.cpp: ~10 minutes on 2 cores
    python bench/vs_llamacpp.py --out bench/out
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_export import export_qwen2  # noqa: E402
from kv_quant_quality import QWEN2_20M, generate_with_logits  # noqa: E402
from report import write_report  # noqa: E402

from prefixcache import Engine, SamplingParams  # noqa: E402
from prefixcache.testing import make_tiny_model  # noqa: E402

GGML_TYPE_F32 = 0  # llama.cpp's KV cache type for float32 (its default is float16)
INSTALL = "pip install 'prefixcache[llamacpp]' (llama-cpp-python compiles llama.cpp: ~10 minutes)"


def require_llamacpp() -> None:
    """Exit with what to install when llama-cpp-python or gguf is missing."""
    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"vs_llamacpp needs {' and '.join(missing)}: {INSTALL}")


class Ours:
    """Our in-process engine with the prefix cache on."""

    def __init__(self, folder: Path, context: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.engine = Engine.from_pretrained(
            str(folder), dtype="float32", max_model_len=context + 1024,
            kv_cache_tokens=2 * context + 4096,
        )  # fmt: skip
        self.one = SamplingParams(max_tokens=1, temperature=0.0)

    def cold(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        self.engine.generate([prompt], self.one)
        return time.perf_counter() - start

    def warm(self, context: list[int], new: list[int]) -> float:
        start = time.perf_counter()
        self.engine.generate([context + new], self.one)
        return time.perf_counter() - start

    def greedy(self, prompt: list[int], count: int):
        return generate_with_logits(self.engine, prompt, count)


class LlamaCpp:
    """llama-cpp-python over the GGUF file; its KV cache kept between calls."""

    def __init__(
        self, gguf_path: Path, context: int, threads: int, flash: bool, kv_f32: bool = False
    ) -> None:
        from llama_cpp import Llama

        kv_types = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
        self.llm = Llama(
            model_path=str(gguf_path), n_ctx=context + 1024, n_batch=2048,
            n_threads=threads, n_threads_batch=threads, flash_attn=flash, verbose=False,
            **kv_types,
        )  # fmt: skip

    def cold(self, prompt: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        self._next()
        return time.perf_counter() - start

    def warm(self, context: list[int], new: list[int]) -> float:
        self.llm.n_tokens = len(context)  # eval drops the KV past here, keeps the rest
        start = time.perf_counter()
        self.llm.eval(new)
        self._next()
        return time.perf_counter() - start

    def greedy(self, prompt: list[int], count: int):
        self.llm.reset()
        self.llm.eval(prompt)
        tokens, logits = [], []
        for _ in range(count):
            row = self._last_logits()
            tokens.append(int(row.argmax()))
            logits.append(torch.from_numpy(row))
            self.llm.eval([tokens[-1]])
        return tokens, torch.stack(logits)

    def _next(self) -> int:
        return int(self._last_logits().argmax())

    def _last_logits(self) -> np.ndarray:
        """The logits of the last id evaluated (llama-cpp-python keeps ``scores`` only
        with ``logits_all``, which would copy every row of a long prompt)."""
        logits = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).astype(np.float32)


def fairness(ours: Ours, theirs: dict, prompt: list[int], count: int) -> dict:
    """Greedy agreement and logit error of each llama.cpp run against ours."""
    tokens, logits = ours.greedy(prompt, count)
    report = {}
    for name, side in theirs.items():
        other_tokens, other_logits = side.greedy(prompt, count)
        pairs = enumerate(zip(tokens, other_tokens, strict=True))
        same = next((i for i, (a, b) in pairs if a != b), count)
        steps = min(same + 1, count)
        error = (logits[:steps] - other_logits[:steps]).abs().max().item()
        report[name] = {"greedy_same_tokens": same, "of": count, "max_abs_logit_diff": error}
    report["logit_std"] = logits.std().item()
    return report


def measure(sides: dict, context: list[int], rounds: int, new_tokens: int, seed: int) -> dict:
    """Cold and warm times per side, rounds interleaved across the sides."""
    rng = np.random.default_rng(seed)
    cold = {name: side.cold(context) for name, side in sides.items()}
    warm = {name: [] for name in sides}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        new = rng.integers(10, 700, new_tokens).tolist()
        for name, side in sides.items():
            warm[name].append(side.warm(context, new))
    return {name: (cold[name], warm[name][1:]) for name in sides}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-tokens", type=int, default=8000)
    parser.add_argument("--new-tokens", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared")
    parser.add_argument("--model-dir", default=None, help="where the model and GGUF go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for vs_llamacpp.json/.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build, convert, check, measure, report."""
    args = parse_args(argv)
    require_llamacpp()
    root = Path(args.model_dir or Path(tempfile.gettempdir()) / "prefixcache-vs-llamacpp")
    folder = make_tiny_model(root / "qwen2-20m", "qwen2", **QWEN2_20M)
    gguf_path = export_qwen2(folder, root / "qwen2-20m-f32.gguf")
    rng = np.random.default_rng(args.seed)
    context = rng.integers(10, 700, args.context_tokens).tolist()
    ours = Ours(folder, args.context_tokens, args.threads)
    theirs = {
        f"llama.cpp fa={'on' if flash else 'off'}{' kv=f32' if f32 else ''}": LlamaCpp(
            gguf_path, args.context_tokens, args.threads, flash, f32
        )
        for flash, f32 in ((False, False), (False, True), (True, False))
    }
    sides = {"ours": ours, **theirs}
    # Timed first: ours must start from an empty cache for its cold prefill.
    times = measure(sides, context, args.rounds, args.new_tokens, args.seed + 1)
    check_prompt = context + rng.integers(10, 700, args.new_tokens).tolist()
    checked = fairness(ours, theirs, check_prompt, args.check_tokens)
    rows, ours_cold, ours_warm = [], times["ours"][0], statistics.median(times["ours"][1])
    for name, (cold, warm) in times.items():
        rows.append({
            "engine": name,
            "cold_prefill_s": round(cold, 3),
            "warm_turn2_ms_median": round(statistics.median(warm) * 1000, 1),
            "warm_turn2_ms_min": round(min(warm) * 1000, 1),
            "ours_over_it_warm": round(ours_warm / statistics.median(warm), 3),
            "ours_over_it_cold": round(ours_cold / cold, 3),
        })  # fmt: skip
    summary = {
        "model": "qwen2-20m float32 random weights",
        "context_tokens": args.context_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "fairness": checked,
    }
    write_report(args.out, "vs_llamacpp", summary, rows)


if __name__ == "__main__":
    main()
