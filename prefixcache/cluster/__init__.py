"""Replicas on Ray Serve with exact prefix-affinity routing (the ``cluster`` extra).

``build_app`` makes the Serve application (an OpenAI-compatible ingress over engine
replicas); ``PrefixAffinityRouter`` routes by the replicas' own chunk chains;
``AffinityIndex`` is its policy, usable without Ray. Ray is imported only when a name
that needs it is used, so ``prefixcache.cluster.affinity`` works without the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "AffinityIndex": "prefixcache.cluster.affinity",
    "Choice": "prefixcache.cluster.affinity",
    "CacheEventLog": "prefixcache.cluster.events",
    "ClusterOptions": "prefixcache.cluster.app",
    "build_app": "prefixcache.cluster.app",
    "PrefixAffinityRouter": "prefixcache.cluster.router",
    "RemoteEngineClient": "prefixcache.cluster.remote_client",
    "EngineReplica": "prefixcache.cluster.replica",
    "serve_cluster": "prefixcache.cluster.launch",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'prefixcache.cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
