"""One prefill step's attention on the CPU: the C kernel against the torch path.

Each shape's new tokens attend over a paged context (the cached prefix and
themselves) in one sequence: ``qwen2-20m`` is the warm turn of ``vs_llamacpp.py`` (36
new tokens over 8,000 cached, 8 query / 2 KV heads of dim 64) and ``tiny`` a later
turn of the 200k-token conversation on the embedded tiny model (30 over 200,000, 4 / 2
heads of dim 16). The C kernel (``kernels.cpu_prefill``) and the torch path it
replaces (``kernels.torch_ref`` without it: torch's attention over the cached prefix
and over the new tokens, merged by log-sum-exp) run interleaved over the same pools,
one layer per call; each call takes the next of ``--layers`` pools, so the keys come
from memory as in a model's forward pass, not from cache. Best of ``--repeats``
calls (the least disturbed by other work on the machine) and the ratio.

    python bench/prefill_kernel.py [--threads 2] [--out bench/out]

Prints a markdown table and a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from report import write_report  # noqa: E402

import kernels.torch_ref as torch_ref  # noqa: E402
from kernels.cpu_prefill import paged_prefill  # noqa: E402
from kernels.metadata import AttentionMetadata  # noqa: E402

# label: (cached tokens, new tokens, query heads, KV heads, head dim)
SHAPES = {"qwen2-20m": (8000, 36, 8, 2, 64), "tiny": (200_000, 30, 4, 2, 16)}
BLOCK = 16


def pools(layers: int, tokens: int, kv_heads: int, dim: int):
    """``layers`` pairs of K/V pools whose blocks a sequence holds in shuffled order."""
    gen = torch.Generator().manual_seed(0)
    blocks = -(-tokens // BLOCK)
    shape = (blocks, BLOCK, kv_heads, dim)
    pairs = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))]
    pairs += [(k.clone(), v.clone()) for k, v in pairs * (layers - 1)]
    return pairs, torch.randperm(blocks, generator=gen).tolist()


def bench_shape(args, cached: int, new: int, heads: int, kv_heads: int, dim: int):
    """Best milliseconds per layer of the kernel and of the torch path."""
    total = cached + new
    layers, table = pools(args.layers, total, kv_heads, dim)
    meta = AttentionMetadata.build([new], [total], [table], BLOCK)
    query = torch.randn(new, heads, dim, generator=torch.Generator().manual_seed(1))
    backend, kernel = torch_ref.TorchReferenceBackend(), torch_ref.prefill_attention
    best = {"kernel": float("inf"), "torch": float("inf")}
    outputs = {}
    for call in range(args.repeats * len(layers)):
        k_cache, v_cache = layers[call % len(layers)]
        for path in best:
            torch_ref.prefill_attention = kernel if path == "kernel" else lambda *a: None
            try:
                start = time.perf_counter()
                outputs[path] = backend.attend(query, k_cache, v_cache, meta, dim**-0.5)
                best[path] = min(best[path], 1000 * (time.perf_counter() - start))
            finally:
                torch_ref.prefill_attention = kernel
    error = (outputs["kernel"] - outputs["torch"]).abs().max().item()
    return best, error


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="pools cycled through")
    parser.add_argument("--repeats", type=int, default=5, help="calls per pool and path")
    parser.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads")
    parser.add_argument("--out", default=None, help="folder for prefill_kernel.json/.md")
    args = parser.parse_args(argv)
    if paged_prefill() is None:
        raise SystemExit("the C prefill kernel is unavailable here (needs a C compiler)")
    torch.set_num_threads(args.threads)
    rows, summary = [], {"bench": "prefill_kernel", "threads": args.threads}
    for label, (cached, new, heads, kv_heads, dim) in SHAPES.items():
        best, error = bench_shape(args, cached, new, heads, kv_heads, dim)
        flops = 4 * new * heads * dim * (cached + new)
        rows.append(
            {
                "shape": label,
                "context": cached + new,
                "new_tokens": new,
                "kernel_ms_per_layer": round(best["kernel"], 3),
                "torch_ms_per_layer": round(best["torch"], 3),
                "kernel_GFLOP_per_s": round(flops / best["kernel"] / 1e6, 1),
                "speedup_vs_torch": round(best["torch"] / best["kernel"], 2),
                "max_abs_diff": float(f"{error:.2e}"),
            }
        )
        summary[f"speedup_vs_torch_{label}"] = rows[-1]["speedup_vs_torch"]
    write_report(args.out, "prefill_kernel", summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
