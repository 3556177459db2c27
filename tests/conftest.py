"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import Phase, settings

from prefixcache.testing import make_tiny_model

# Under scripts/mutation.sh a failing example only has to be found, not shrunk: shrinking
# the failures a mutant causes can take minutes per mutant, and their size is unused.
if os.environ.get("PREFIXCACHE_MUTATION"):
    settings.register_profile("mutation", phases=[Phase.explicit, Phase.generate])
    settings.load_profile("mutation")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Return `(arch, **overrides) -> Path`, building each distinct tiny model once."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[str, str], Path] = {}

    def factory(arch: str = "llama", **overrides: Any) -> Path:
        key = (arch, json.dumps(overrides, sort_keys=True, default=repr))
        if key not in built:
            built[key] = make_tiny_model(root / f"{arch}-{len(built)}", arch, **overrides)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    """The default tiny llama model folder."""
    return tiny_model_factory("llama")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Tiny test models run fastest and most repeatably on one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
