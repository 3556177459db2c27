"""How much a quantized KV cache (int8, fp8) changes a model's output.

For each model and prompt length, greedy decoding of ``--gen-tokens`` tokens runs with
the KV cache at the model's dtype (float32 here: the reference), then at each
quantized KV dtype, and every step's logits are kept. Reported per KV dtype:

* ``max_abs_logit_error`` / ``mean_abs_logit_error``: |logit - reference logit| over
  the whole vocabulary, at the steps whose context is still the reference's (every
  step up to and including the first one whose greedy token differs);
* ``greedy_agreement``: generated tokens equal to the reference's before the first
  difference, over ``--gen-tokens`` (1.0: the same text throughout);
* ``kv_bytes_per_token`` and its ratio to the reference's.

Models: the tiny test models (``prefixcache.testing``), and a 20M-parameter
Qwen2-shaped model with random weights (8 layers, hidden 512, 8 query and 2 KV heads
of 64, MLP 1024), which only this script builds. Random weights: the numbers say how
far quantization moves logits and greedy choices, not how a trained model's answers
change.

    python bench/kv_quant_quality.py --out bench/out
    python bench/kv_quant_quality.py --models qwen2-20m --prompt-tokens 1000 8000 32000

Prints a markdown table and a one-line JSON summary last; ``--out`` also writes
``kv_quant_quality.json``/``.md``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from report import write_report  # noqa: E402

from prefixcache import Engine, SamplingParams  # noqa: E402
from prefixcache.testing import make_tiny_model  # noqa: E402

QWEN2_20M = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 40960,
}
MODELS = {
    "tiny-llama": ("llama", {}),
    "tiny-qwen3": ("qwen3", {}),
    "qwen2-20m": ("qwen2", QWEN2_20M),
}
QUANTIZED = ("int8", "fp8")


def generate_with_logits(engine: Engine, prompt: list[int], max_tokens: int):
    """Greedy tokens for ``prompt`` and the logits each one was chosen from."""
    runner, kept = engine.core.runner, {}
    original = runner.run

    def run(chunks, all_logits=False):
        logits = original(chunks, all_logits)
        kept["last"] = logits[-1].float().clone()  # one request: its row is the last
        return logits

    runner.run = run
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = engine.add_request(prompt, params)
        tokens, logits, done = [], [], False
        while not done:
            for delta in engine.step():
                if delta.request_id == request and delta.token_ids:
                    tokens += delta.token_ids
                    logits.append(kept["last"])
                done = done or (delta.request_id == request and delta.finish_reason is not None)
    finally:
        runner.run = original
    return tokens, torch.stack(logits)


def compare(reference, tokens: list[int], logits: torch.Tensor) -> dict:
    """Logit error at identical contexts, and greedy agreement, against ``reference``."""
    ref_tokens, ref_logits = reference
    same = 0
    while same < len(tokens) and tokens[same] == ref_tokens[same]:
        same += 1
    steps = min(same + 1, len(tokens))  # the first differing step still shares its context
    error = (logits[:steps] - ref_logits[:steps]).abs()
    return {
        "max_abs_logit_error": error.max().item(),
        "mean_abs_logit_error": error.mean().item(),
        "greedy_agreement": same / len(ref_tokens),
        "compared_steps": steps,
        "reference_logit_std": ref_logits[:steps].std().item(),  # the scale errors compare to
        # Random weights give near-ties: a top-2 gap below the error can flip a choice.
        "reference_median_top2_gap": _median_top2_gap(ref_logits),
    }


def _median_top2_gap(logits: torch.Tensor) -> float:
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).median().item()


def bench_model(args, name: str, folder: Path) -> list[dict]:
    """Rows for one model: one per prompt length and quantized KV dtype."""
    rows = []
    for length in args.prompt_tokens:
        rng = random.Random(length)
        engines = {kv: _engine(folder, kv, length + args.gen_tokens) for kv in ("auto", *QUANTIZED)}
        vocab = engines["auto"].model_config.vocab_size
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        start = time.perf_counter()
        reference = generate_with_logits(engines["auto"], prompt, args.gen_tokens)
        seconds = {"auto": time.perf_counter() - start}
        full_bytes = engines["auto"].stats()["kv_bytes_per_token"]
        for kv in QUANTIZED:
            start = time.perf_counter()
            tokens, logits = generate_with_logits(engines[kv], prompt, args.gen_tokens)
            seconds[kv] = time.perf_counter() - start
            per_token = engines[kv].stats()["kv_bytes_per_token"]
            row = {"model": name, "prompt_tokens": length, "kv_cache_dtype": kv}
            row |= compare(reference, tokens, logits)
            row |= {"kv_bytes_per_token": per_token, "kv_bytes_ratio": full_bytes / per_token}
            rows.append(row | {"seconds": seconds[kv], "seconds_auto": seconds["auto"]})
            print(_line(row), file=sys.stderr, flush=True)
        del engines
    return rows


def _engine(folder: Path, kv_cache_dtype: str, max_len: int) -> Engine:
    tokens = -(-max_len // 256) * 256
    return Engine.from_pretrained(
        str(folder), device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype,
        kv_cache_tokens=tokens, max_model_len=tokens, enable_prefix_caching=False,
    )  # fmt: skip


def _line(row: dict) -> str:
    return (
        f"{row['model']} {row['prompt_tokens']} {row['kv_cache_dtype']}: "
        f"max {row['max_abs_logit_error']:.4g} mean {row['mean_abs_logit_error']:.3g} "
        f"agreement {row['greedy_agreement']:.3f}"
    )


def _summary(rows: list[dict], models: dict[str, int]) -> dict:
    summary = {"bench": "kv_quant_quality", "parameters": models}
    for kv in QUANTIZED:
        mine = [r for r in rows if r["kv_cache_dtype"] == kv]
        summary[f"{kv}_max_abs_logit_error"] = max(r["max_abs_logit_error"] for r in mine)
        summary[f"{kv}_mean_abs_logit_error"] = sum(r["mean_abs_logit_error"] for r in mine) / len(
            mine
        )
        summary[f"{kv}_min_greedy_agreement"] = min(r["greedy_agreement"] for r in mine)
        summary[f"{kv}_kv_bytes_ratio"] = min(r["kv_bytes_ratio"] for r in mine)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1000, 8000, 32000])
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for kv_quant_quality.json/.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory(prefix="kv-quality-") as scratch:
        for name in args.models:
            arch, overrides = MODELS[name]
            folder = make_tiny_model(Path(scratch) / name, arch, **overrides)
            sizes[name] = _parameters(folder)
            rows += bench_model(args, name, folder)
    write_report(args.out, "kv_quant_quality", _summary(rows, sizes), rows)
    return 0


def _parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())  # noqa: SIM118
    return total


if __name__ == "__main__":
    sys.exit(main())
