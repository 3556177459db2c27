"""Which ``PrefixAffinityRouter`` serves this process's handles to a deployment.

Serve pickles a router class's module by value, so a router's own module globals are
a copy in every process; this module is imported normally, so a router registers
here and the ``RemoteEngineClient`` beside it (in the same process) finds it.
"""

from __future__ import annotations

import weakref
from typing import Any

_ROUTERS: dict[tuple[str, str], weakref.ref] = {}  # (app, deployment) -> router


def register(app: str, deployment: str, router: Any) -> None:
    """Note ``router`` as the one for ``app``'s ``deployment`` in this process."""
    _ROUTERS[(app, deployment)] = weakref.ref(router)


def router_for(deployment: str, app: str) -> Any | None:
    """The router for ``app``'s ``deployment`` here (None: none yet, or another kind)."""
    ref = _ROUTERS.get((app, deployment))
    return ref() if ref is not None else None
