"""API keys, and the per-tenant prefix-cache salt derived from them.

Tenant isolation (the lesson of vLLM's CVE-2025-46570): cached prefixes are shared
only between requests with the same salt, and a cache hit is observable through
timing and ``cached_tokens``. So the salt is derived here, on the server, from a hash
of the caller's API key; a request's own ``cache_salt`` can only narrow sharing
further within its tenant, never reach into another tenant's entries.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request

from server.errors import APIError

_SALT_DOMAIN = b"prefixcache-tenant-salt-v1"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The accepted API keys, kept only as SHA-256 digests. Empty means no auth."""

    def __init__(self, api_keys: Iterable[str] = ()) -> None:
        keys = [k for k in api_keys if k]
        self._digests = tuple(dict.fromkeys(_digest(k) for k in keys))

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


def tenant_salt(tenant: bytes | None, cache_salt: str | None) -> str | None:
    """The engine salt for a request; None (the shared cache) only without key and salt.

    Length-prefixed parts keep distinct (tenant, cache_salt) pairs from colliding.
    """
    if tenant is None and not cache_salt:
        return None
    parts = (tenant or b"", (cache_salt or "").encode("utf-8", "surrogatepass"))
    h = hashlib.sha256(_SALT_DOMAIN)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


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
