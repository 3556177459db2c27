"""Tenants of the prefix cache: which salts belong together.

Every salt has its own tree, so nothing is shared between salts. A front that gives
one tenant many salts (one per ``cache_salt``) writes them as ``TENANT:REST``; the
cache then flushes, and the pin registry caps, per tenant.
"""

from __future__ import annotations

TENANT_SEPARATOR = ":"


def salt_tenant(salt: str | None) -> str:
    """The tenant a salt belongs to: its part before the first ``TENANT_SEPARATOR``
    (the whole salt when it has none; ``""`` for the shared, unsalted cache)."""
    if salt is None:
        return ""
    return salt.partition(TENANT_SEPARATOR)[0]
