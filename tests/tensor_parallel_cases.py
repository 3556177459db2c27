"""Tiny models of every architecture run at TP=1 and TP=2 (see test_tensor_parallel_model).

``run_case`` runs the same steps at any layout: a batched prefill of two sequences,
then greedy decode steps of both, through ``ModelRunner`` and ``KVCache`` with the
torch attention backend. ``rank_main`` is the body of one spawned rank: it joins a
``gloo`` group, runs every case sharded, counts what it read from the checkpoints, and
saves its results for the test to compare.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import torch

from kernels import get_backend
from prefixcache.cache.kv_cache import KVCache
from prefixcache.engine.model_runner import ModelRunner, SequenceChunk
from prefixcache.models.config import ModelConfig
from prefixcache.models.loader import load_model
from prefixcache.models.parallel import TensorParallel
from prefixcache.models.parallel_layers import ParallelLMHead, VocabParallelEmbedding

ROOT = Path(__file__).resolve().parents[1]

# name -> (make_tiny_model arch, config overrides). The base shape has 4 query heads
# and 2 KV heads: split one each at TP=2; the ``kv1`` cases replicate their one KV
# head. A vocabulary of 251 is odd, so the last rank holds a padding row.
_ODD_VOCAB = {"vocab_size": 251, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-kv1-vocab251": ("llama", {"num_key_value_heads": 1, **_ODD_VOCAB}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3-kv1": ("qwen3", {"num_key_value_heads": 1}),
    "phi3": ("phi3", {}),
    "phi3-kv1-vocab251": ("phi3", {"num_key_value_heads": 1, **_ODD_VOCAB}),
    "gemma2-vocab251": ("gemma2", _ODD_VOCAB),
    "gemma3": ("gemma3_text", {}),
    "mixtral": ("mixtral", {}),
    "qwen2-moe": ("qwen2_moe", {}),
    "qwen3-moe": ("qwen3_moe", {}),
}
_VOCAB_LAYERS = (VocabParallelEmbedding, ParallelLMHead)
BENCH_SHAPE = "qwen3-moe"  # bench/tiny_models.py's shape (8:1 heads, 64 experts), 2 layers

PROMPTS = ((30, 0), (13, 3))  # (tokens, first block) of the two sequences
SPLIT = 18  # the first sequence's first prefill chunk
BLOCK_SIZE, NUM_BLOCKS, DECODE_STEPS = 16, 6, 3


def build_folders(root: Path) -> dict[str, Path]:
    """Write every case's model folder under ``root``."""
    from prefixcache.testing import make_tiny_model

    sys.path.insert(0, str(ROOT / "bench"))
    from tiny_models import SHAPES

    folders = {name: make_tiny_model(root / name, arch, **o) for name, (arch, o) in CASES.items()}
    arch, overrides = SHAPES[BENCH_SHAPE]
    bench = {**overrides, "num_hidden_layers": 2}
    folders[f"bench-{BENCH_SHAPE}"] = make_tiny_model(root / "bench-shape", arch, **bench)
    return folders


@torch.inference_mode()
def run_case(folder: Path, parallel: TensorParallel | None) -> dict[str, torch.Tensor]:
    """Prefill two sequences (the first in two chunks, the second chunk over the cached
    first), then decode both greedily; every logit of every step."""
    config = ModelConfig.from_folder(folder)
    cpu = torch.device("cpu")
    model = load_model(folder, config, torch.float32, cpu, "auto", parallel)
    kv = KVCache(model.config.for_rank(parallel), NUM_BLOCKS, BLOCK_SIZE, torch.float32, cpu)
    runner = ModelRunner(model, kv, get_backend("torch", cpu), cpu)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 251, (n,), generator=generator).tolist() for n, _ in PROMPTS]
    tables = [list(range(first, first + 3)) for _, first in PROMPTS]
    first = [
        SequenceChunk(prompts[0][:SPLIT], 0, tables[0]),
        SequenceChunk(prompts[1], 0, tables[1]),
    ]
    rest = SequenceChunk(prompts[0][SPLIT:], SPLIT, tables[0])
    prefill = torch.cat([runner.run(first, all_logits=True), runner.run([rest], all_logits=True)])
    last = prefill[[-1, len(first[0].token_ids) + len(prompts[1]) - 1]]
    chunks = [rest, first[1]]
    steps, ids = [], []
    for _ in range(DECODE_STEPS):
        tokens = last.argmax(dim=-1).tolist()
        ids.append(tokens)
        chunks = [
            SequenceChunk([tok], c.num_computed + len(c.token_ids), c.block_ids)
            for tok, c in zip(tokens, chunks, strict=True)
        ]
        last = runner.run(chunks)
        steps.append(last)
    decode, ids = torch.stack(steps), torch.tensor(ids)
    return {"prefill": prefill, "decode": decode, "ids": ids, "held": held_elements(model)}


class _CountingSlice:
    """A safetensors slice that counts the elements read through it."""

    def __init__(self, inner, counts: dict[str, int]) -> None:
        self.inner, self.counts = inner, counts

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        tensor = self.inner[index]
        self.counts["elements"] += tensor.numel()
        return tensor


class _CountingFile:
    """A ``safe_open`` handle whose slices count their reads and whose whole-tensor
    reads are recorded (the sharded loader must make none)."""

    def __init__(self, inner, counts: dict[str, int]) -> None:
        self.inner, self.counts = inner, counts

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, name):
        return _CountingSlice(self.inner.get_slice(name), self.counts)

    def get_tensor(self, name):
        self.counts["whole_tensors"] += 1
        return self.inner.get_tensor(name)


def held_elements(model: torch.nn.Module) -> int:
    """Checkpoint elements a rank's model holds: its parameters less vocabulary padding
    (a tied LM head shares the embedding's rows, counted once)."""
    total = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    padded = {id(m.weight): m for m in model.modules() if isinstance(m, _VOCAB_LAYERS)}
    for module in padded.values():
        per, rows = module.parallel.padded_range(vocab)
        total -= (per - len(rows)) * module.weight.shape[1]
    return total


def rank_main(rank: int, port: int, folders: dict[str, Path], out: Path) -> None:
    """One rank of a 2-process ``gloo`` group: every case at TP=2, results to ``out``."""
    import torch.distributed as dist

    import prefixcache.models.parallel_loader as parallel_loader

    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2, timeout=timeout)
    parallel = TensorParallel(rank=rank, size=2)
    real_open, results = parallel_loader.safe_open, {}
    try:
        for name, folder in folders.items():
            counts = {"elements": 0, "whole_tensors": 0}
            parallel_loader.safe_open = lambda *a, c=counts, **k: _CountingFile(
                real_open(*a, **k), c
            )
            results[name] = {**run_case(folder, parallel), **counts}
    finally:
        parallel_loader.safe_open = real_open
        torch.save(results, out / f"rank{rank}.pt")
        dist.destroy_process_group()
