"""One decode step's attention on the CPU: the C kernel over float32, int8 and fp8 pools.

A batch of ``--seqs`` sequences of ``--context`` cached tokens each, one new query per
sequence, for each head shape (query heads, KV heads, head dim): the time of one
call of the float32 kernel (``kernels.cpu_native``) and of the quantized one
(``kernels.cpu_quant``) over the same keys and values, interleaved, best of
``--repeats`` (the least disturbed by other work on the machine). The ratio is the
float32 time over the quantized time, for one layer; the bytes each call reads are
reported beside it.

    python bench/kv_decode_kernel.py [--seqs 20 --context 10000] [--threads 2]

Prints a markdown table and a one-line JSON summary last; ``--out`` also writes
``kv_decode_kernel.json``/``.md``.
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

from kernels.cpu_native import decode_attention  # noqa: E402
from kernels.cpu_quant import decode_attention_quant  # noqa: E402
from kernels.kv_quant import CODE_DTYPES, write_quantized  # noqa: E402

SHAPES = {"tiny (4/2 x 16)": (4, 2, 16), "qwen2-20m (8/2 x 64)": (8, 2, 64)}
BLOCK = 16


def bench_shape(args, heads: int, kv_heads: int, dim: int) -> dict[str, float]:
    """Best milliseconds per call for float32 and each quantized KV dtype."""
    gen = torch.Generator().manual_seed(0)
    blocks = args.seqs * -(-args.context // BLOCK)
    keys = torch.randn(blocks, BLOCK, kv_heads, dim, generator=gen)
    values = torch.randn(blocks, BLOCK, kv_heads, dim, generator=gen)
    query = torch.randn(args.seqs, heads, dim, generator=gen)
    tables = torch.arange(blocks, dtype=torch.int32).view(args.seqs, -1)
    lens = torch.full((args.seqs,), args.context, dtype=torch.int32)
    calls = {"float32": lambda: decode_attention(query, keys, values, tables, lens, 0.125)}
    for name, dtype in CODE_DTYPES.items():
        k_pool = torch.zeros(blocks, BLOCK, kv_heads, dim + 2, dtype=dtype)
        v_pool = torch.zeros_like(k_pool)
        rows = torch.arange(blocks * BLOCK)
        write_quantized(keys.flatten(0, 1), values.flatten(0, 1), k_pool, v_pool, rows)
        calls[name] = lambda k=k_pool, v=v_pool: decode_attention_quant(
            query, k, v, tables, lens, 0.125
        )
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            if call() is None:
                raise RuntimeError("the native decode kernels are unavailable here")
            best[name] = min(best[name], 1000 * (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, default=20)
    parser.add_argument("--context", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads")
    parser.add_argument("--out", default=None, help="folder for kv_decode_kernel.json/.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, summary = [], {"bench": "kv_decode_kernel", "seqs": args.seqs, "context": args.context}
    for label, (heads, kv_heads, dim) in SHAPES.items():
        best = bench_shape(args, heads, kv_heads, dim)
        tokens = args.seqs * args.context
        for name, ms in best.items():
            row_bytes = dim * 4 if name == "float32" else dim + 2
            read = 2 * tokens * kv_heads * row_bytes
            rows.append(
                {
                    "shape": label,
                    "kv": name,
                    "ms_per_layer": round(ms, 3),
                    "MB_read": round(read / 1e6, 1),
                    "GB_per_s": round(read / ms / 1e6, 2),
                    "speedup_vs_float32": round(best["float32"] / ms, 2),
                }
            )
            if name != "float32":
                summary[f"{name}_speedup_{dim}"] = round(best["float32"] / ms, 2)
    write_report(args.out, "kv_decode_kernel", summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
