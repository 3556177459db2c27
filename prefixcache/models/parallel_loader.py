"""Load one tensor-parallel rank's weights, reading only its slices of each tensor.

Checkpoint names are mapped to our parameters by a one-rank model built on the meta
device (``reference``): its ``_locate`` says where a checkpoint tensor sits in the
whole, fused parameter. The rank's parameter says which runs of the whole it holds
(``parallel_layers.ShardRuns``); each run that overlaps the tensor is read with
``safe_open(...).get_slice(name)[...]``, so a fused tensor (Phi-3's ``qkv_proj``) is
cut into its q, k and v parts before slicing, and no rank reads a whole sharded tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from prefixcache.models.parallel_layers import ShardRuns


@torch.no_grad()
def load_sharded(model: nn.Module, reference: nn.Module, files: list[Path]) -> set[str]:
    """Fill ``model``'s parameters (one rank's shards) from the safetensors ``files``;
    returns the checkpoint names loaded. ``reference`` is the same architecture built
    for one rank on the meta device."""
    params = dict(model.named_parameters())
    tied = reference.config.tie_word_embeddings
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                if "rotary_emb" in name:
                    continue
                target, index = reference._locate(name)
                if target not in params:
                    if tied and target == "lm_head.weight":
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
                region = _Region.of(reference.get_parameter(target).shape, index)
                source = handle.get_slice(name)  # reads nothing until indexed
                region.check(name, source.get_shape())
                _copy_runs(source, region, params[target], _runs_of(model, target))
                loaded.add(name)
    return loaded


def _runs_of(model: nn.Module, target: str) -> ShardRuns | None:
    owner, _, leaf = target.rpartition(".")
    return getattr(model.get_submodule(owner), "shard_runs", {}).get(leaf)


class _Region:
    """Where a checkpoint tensor sits in a whole parameter: ``[start, stop)`` per
    parameter dimension, and the dimensions it has no axis for (an expert index)."""

    def __init__(self, bounds: list[tuple[int, int]], squeezed: set[int]) -> None:
        self.bounds, self.squeezed = bounds, squeezed

    @classmethod
    def of(cls, shape: torch.Size, index) -> _Region:
        """The region ``param[index]`` selects (``index``: None, an int, a slice, or a
        tuple of them, as the models' ``_locate`` returns)."""
        bounds = [(0, size) for size in shape]
        parts = () if index is None else index if isinstance(index, tuple) else (index,)
        squeezed = set()
        for dim, part in enumerate(parts):
            if isinstance(part, int):
                bounds[dim] = (part, part + 1)
                squeezed.add(dim)
            else:
                start, stop, _ = part.indices(shape[dim])
                bounds[dim] = (start, stop)
        return cls(bounds, squeezed)

    @property
    def shape(self) -> tuple[int, ...]:
        """The checkpoint tensor's expected shape."""
        kept = (b for d, b in enumerate(self.bounds) if d not in self.squeezed)
        return tuple(stop - start for start, stop in kept)

    def check(self, name: str, shape) -> None:
        """A ValueError when the checkpoint tensor's shape is not the region's."""
        if tuple(shape) != self.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(shape)}, expected {self.shape}"
            )

    def dest(self, dim: int | None = None, span: slice | None = None) -> tuple:
        """Index of the region in the rank's parameter, ``span`` along ``dim``."""
        index = []
        for d, (start, stop) in enumerate(self.bounds):
            if d == dim:
                index.append(span)
            else:
                index.append(start if d in self.squeezed else slice(start, stop))
        return tuple(index)


def _copy_runs(source, region: _Region, param: nn.Parameter, runs: ShardRuns | None) -> None:
    if runs is None:  # replicated: the whole tensor
        param.data[region.dest()].copy_(source[:])
        return
    if runs.dim in region.squeezed:
        raise ValueError("a parameter cannot be sharded along an indexed dimension")
    start, stop = region.bounds[runs.dim]
    axis = runs.dim - sum(1 for d in region.squeezed if d < runs.dim)
    rank = len(region.shape)
    for whole_start, local_start, length in runs.runs:
        lo, hi = max(whole_start, start), min(whole_start + length, stop)
        if lo >= hi:
            continue
        read = [slice(None)] * rank
        read[axis] = slice(lo - start, hi - start)
        local = slice(local_start + lo - whole_start, local_start + hi - whole_start)
        param.data[region.dest(runs.dim, local)].copy_(source[tuple(read)])
