"""Model architectures by their config.json ``architectures`` name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from prefixcache.models.config import ModelConfig

ConfigAdapter = Callable[[ModelConfig], ModelConfig]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model class and the architecture-specific facts config.json leaves implicit."""

    model_class: type[nn.Module]
    adapt_config: ConfigAdapter | None = None


_MODELS: dict[str, ModelEntry] = {}


def register_model(*names: str, adapt_config: ConfigAdapter | None = None):
    """Class decorator registering a model class under one or more architecture names."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        for name in names:
            _MODELS[name] = ModelEntry(cls, adapt_config)
        return cls

    return decorate


def supported_architectures() -> list[str]:
    """Architecture names that can be loaded."""
    return sorted(_MODELS)


def resolve_model(config: ModelConfig) -> tuple[type[nn.Module], ModelConfig]:
    """The class for ``config.architecture`` and the config adapted for it."""
    entry = _MODELS.get(config.architecture)
    if entry is None:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; supported: "
            + ", ".join(supported_architectures())
        )
    adapted = entry.adapt_config(config) if entry.adapt_config else config
    return entry.model_class, adapted
