"""Random-weight model folders shaped like real ones, scaled down, for the benchmarks.

Each shape keeps its model's architecture, proportions and RoPE scaling (head counts,
experts per token out of all experts, YaRN for 128k) at a size a CPU runs; weights are
random (``prefixcache.testing.make_tiny_model``), so only speed and memory mean
anything. Prints the folder, ready for ``--model``:

    python bench/tiny_models.py qwen3-moe --out /tmp/qwen3-moe
    python bench/long_prompt.py --scenario conversation --model /tmp/qwen3-moe ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# name -> (make_tiny_model arch, config overrides)
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # Qwen3-30B-A3B / 8: 8 of 128 experts -> 8 of 64, 32:4 query:KV heads -> 8:1,
    # YaRN x4 over 32k as its 128k deployments configure it (max_position_embeddings
    # 131072, so transformers sees the factor it expects).
    "qwen3-moe": (
        "qwen3_moe",
        {
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 96,
            "norm_topk_prob": True,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        },
    ),
}


def build(name: str, folder: Path) -> Path:
    """Write (or reuse) the folder of shape ``name``."""
    from prefixcache.testing import make_tiny_model

    arch, overrides = SHAPES[name]
    return make_tiny_model(folder, arch, **overrides)


def main(argv: list[str] | None = None) -> None:
    """Build one shape and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, help="folder to write the model into")
    args = parser.parse_args(argv)
    print(build(args.shape, Path(args.out)))


if __name__ == "__main__":
    main()
