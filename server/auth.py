"""API keys, and the per-tenant prefix-cache salt derived from them.

Tenant isolation (the lesson of vLLM's CVE-2025-46570): cached prefixes are shared
only between requests with the same salt, and a cache hit is observable through
timing and ``cached_tokens``. So the salt is derived here, on the server, from a hash
of the caller's API key; a request's own ``cache_salt`` can only narrow sharing
further within its tenant, never reach into another tenant's entries.

Every salt of one key is ``TENANT:REST`` with the same ``TENANT`` (``tenant_id``), so
the engine caps pins and flushes the cache per tenant. Admin keys are accepted keys
whose callers may act on every tenant (flush the whole cache).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request

from prefixcache.client import TENANT_SEPARATOR
from server.errors import APIError

_SALT_DOMAIN = b"prefixcache-tenant-salt-v1"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The accepted API keys, kept only as SHA-256 digests. Empty means no auth.

    ``admin_keys`` are accepted too, and mark their callers as admins (``is_admin``).
    """

    def __init__(self, api_keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> None:
        admins = [_digest(k) for k in admin_keys if k]
        keys = [_digest(k) for k in api_keys if k] + admins
        self._digests = tuple(dict.fromkeys(keys))
        self._admins = frozenset(admins)

    def is_admin(self, tenant: bytes | None) -> bool:
        """True when ``tenant`` (from ``authenticate``) is an admin key's digest."""
        return tenant is not None and tenant in self._admins

    @property
    def enabled(self) -> bool:
        """True when callers must present one of the keys."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, authorization: str | None) -> bytes | None:
        """The caller's key digest (its tenant id), None when auth is off; else a 401.

        ``authorization`` is the raw ``Authorization`` header value.
        """
        if not self.enabled:
            return None
        token = _bearer_token(authorization)
        if token is None:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(token)
        # Compare against every key so the time taken does not say which one matched.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        if not any(matches):
            raise _unauthorized("incorrect API key provided")
        return digest


def tenant_id(tenant: bytes | None) -> str:
    """The engine's name for a caller's tenant: a hash of its key digest (``""`` when
    auth is off: every caller is then one tenant)."""
    if tenant is None:
        return ""
    return hashlib.sha256(_SALT_DOMAIN + b"/tenant/" + tenant).hexdigest()[:32]


def tenant_salt(tenant: bytes | None, cache_salt: str | None) -> str | None:
    """The engine salt for a request; None (the shared cache) only without key and salt.

    ``tenant_id:HASH``, where HASH covers the tenant and ``cache_salt`` length-prefixed
    (so distinct pairs never collide) and is empty without a ``cache_salt``.
    """
    if tenant is None and not cache_salt:
        return None
    rest = ""
    if cache_salt:
        parts = (tenant or b"", cache_salt.encode("utf-8", "surrogatepass"))
        h = hashlib.sha256(_SALT_DOMAIN)
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        rest = h.hexdigest()
    return tenant_id(tenant) + TENANT_SEPARATOR + rest


def read_keys_file(path: str | Path) -> list[str]:
    """API keys from a file, one per line; blank lines and ``#`` comments are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def authenticate(request: Request) -> bytes | None:
    """FastAPI dependency: the caller's tenant id (a hash of its API key), or None when
    auth is off; a 401 for a missing or wrong key."""
    keys: KeyRing = request.app.state.server.keys
    return keys.authenticate(request.headers.get("authorization"))
