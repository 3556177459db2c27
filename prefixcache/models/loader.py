"""Build a model from a Hugging Face folder: config, architecture lookup, safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from prefixcache.config import LOAD_FORMATS
from prefixcache.models import resolve_model
from prefixcache.models.config import ModelConfig
from prefixcache.models.parallel import TensorParallel, building_for, check_layout
from prefixcache.models.parallel_loader import load_sharded

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config: ModelConfig):
    """The dtype to run in: explicit choice, else float32 on CPU and bf16/fp16 on GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if config.torch_dtype == "float16" else torch.bfloat16


def resolve_model_path(model: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id fetched into the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
        return Path(snapshot_download(str(model), allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        message = f"cannot find model {model!r} locally or on the hub: {exc}"
        raise FileNotFoundError(message) from exc


def load_model(
    folder: Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    parallel: TensorParallel | None = None,
) -> nn.Module:
    """Instantiate the registered class for ``config`` and fill its weights.

    With ``parallel`` (size > 1) the model is this rank's shard (``models.parallel``):
    every rank of the group must call this, and each reads only its slices.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose {', '.join(LOAD_FORMATS)}")
    model_class, config = resolve_model(config)
    if parallel is not None and parallel.size == 1:
        parallel = None
    if parallel is not None:
        check_layout(config, parallel)
    with torch.device("meta"), building_for(parallel):
        model = model_class(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # moving off the meta device unties shared parameters
    if load_format == "dummy":
        _init_dummy(model)
    elif parallel is None:
        _load_safetensors(model, folder, device)
    else:
        _load_rank_slices(model, model_class, config, folder)
    return model.eval()


def _load_rank_slices(model: nn.Module, model_class, config: ModelConfig, folder: Path) -> None:
    with torch.device("meta"):
        reference = model_class(config)  # the one-rank layout names the whole tensors
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # vocabulary padding rows are never loaded
    loaded = load_sharded(model, reference, safetensors_files(folder))
    _check_complete(reference, loaded, folder)


def _load_safetensors(model: nn.Module, folder: Path, device: torch.device) -> None:
    loaded = model.load_weights(_iter_tensors(folder, device))
    _check_complete(model, _loaded_names(loaded), folder)


def _check_complete(model: nn.Module, loaded: set[str], folder: Path) -> None:
    missing = sorted(model.expected_checkpoint_names() - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint in {folder} is missing {len(missing)} weights: {shown}")


def _loaded_names(loaded: set[str]) -> set[str]:
    # Fused targets are recorded as "target[checkpoint name]"; keep the checkpoint name.
    return {name.split("[", 1)[1][:-1] if "[" in name else name for name in loaded}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder, following a sharded index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / name for name in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in model folder {folder}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"weight shard {file.name} listed in the index is missing")
    return files


def _iter_tensors(folder: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                yield name, handle.get_tensor(name)


@torch.no_grad()
def _init_dummy(model: nn.Module, std: float = 0.02) -> None:
    """Random weights of the right shapes, for benchmarks of real sizes without downloads."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
