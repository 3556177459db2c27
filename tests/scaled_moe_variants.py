"""The tiny mixture-of-experts and scaled-RoPE models the tests run, by name."""

from __future__ import annotations

HALF_HEAD = 8  # the tiny models' head_dim (16) / 2

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32}  # fmt: skip
# Pinned at 4 x 64 = 256 tokens.
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "short_factor": [1.0 + 0.05 * i for i in range(HALF_HEAD)],
    "long_factor": [1.0 + 3.0 * i for i in range(HALF_HEAD)],
}

# name -> (arch, config overrides)
VARIANTS = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "yarn": ("qwen3", {"rope_parameters": YARN}),
    "dynamic": ("llama", {"rope_parameters": DYNAMIC, "max_position_embeddings": 64}),
    "longrope": ("llama", {"rope_parameters": LONGROPE}),
    # Phi-3 keeps its pretraining length beside rope_parameters, and it takes precedence.
    "phi3-longrope": (
        "phi3",
        {
            "rope_parameters": {**LONGROPE, "original_max_position_embeddings": 4096},
            "original_max_position_embeddings": 32,
        },
    ),
}


def variant_folder(factory, name: str):
    """The tiny model folder of variant ``name``."""
    arch, overrides = VARIANTS[name]
    return factory(arch, **overrides)
