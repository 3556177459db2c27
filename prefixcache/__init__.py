"""prefixcache: long-context prefix-caching LLM serving.

Public names are imported on first use, so ``import prefixcache.testing`` or the CLI's
``--help`` do not pay for loading torch and the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Engine", "RequestDelta", "RequestOutput", "SamplingParams"]

_LOCATIONS = {
    "Engine": "prefixcache.sdk",
    "RequestDelta": "prefixcache.outputs",
    "RequestOutput": "prefixcache.outputs",
    "SamplingParams": "prefixcache.sampling_params",
}

if TYPE_CHECKING:
    from prefixcache.outputs import RequestDelta, RequestOutput
    from prefixcache.sampling_params import SamplingParams
    from prefixcache.sdk import Engine


def __getattr__(name: str):
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'prefixcache' has no attribute {name!r}")
    return getattr(importlib.import_module(_LOCATIONS[name]), name)
