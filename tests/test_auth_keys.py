"""API keys and tenant salts (server/auth.py) without a server: the header forms that
are accepted and refused, the 401 a client sees, admin keys, keys files, and the
salt format, which names entries in the disk tier and so must not drift."""

from __future__ import annotations

import pytest

from prefixcache.client import TENANT_SEPARATOR
from server.auth import KeyRing, read_keys_file, tenant_id, tenant_salt
from server.errors import APIError

# A key digest (what ``KeyRing.authenticate`` returns) for the reference values.
TENANT = b"\x01" * 32


def _refused(ring: KeyRing, header: str | None) -> APIError:
    with pytest.raises(APIError) as caught:
        ring.authenticate(header)
    return caught.value


def test_a_bearer_key_is_accepted_with_any_case_and_spacing_of_the_scheme():
    ring = KeyRing(["sk-a"])
    digest = ring.authenticate("Bearer sk-a")
    assert digest is not None and len(digest) == 32
    for header in ("bearer sk-a", "BEARER  sk-a", "  Bearer sk-a  "):
        assert ring.authenticate(header) == digest


def test_a_key_with_a_space_in_it_is_one_key():
    ring = KeyRing(["two words"])
    assert ring.authenticate("Bearer two words") is not None
    assert _refused(ring, "Bearer words").status == 401


def test_another_scheme_with_a_valid_key_is_refused_as_missing():
    ring = KeyRing(["sk-a"])
    for header in ("Basic sk-a", "sk-a", "Bearer", "Bearer   ", "", None):
        error = _refused(ring, header)
        assert error.message == "missing API key: send 'Authorization: Bearer <key>'"


def test_a_wrong_key_gets_a_401_that_names_the_bearer_scheme():
    error = _refused(KeyRing(["sk-a"]), "Bearer sk-b")
    assert error.status == 401 and error.code == "invalid_api_key"
    assert error.message == "incorrect API key provided"
    assert error.headers == {"WWW-Authenticate": "Bearer"}


def test_admin_keys_are_accepted_and_only_they_are_admins():
    ring = KeyRing(["sk-user"], admin_keys=["sk-admin"])
    assert len(ring) == 2 and ring.enabled
    user, admin = ring.authenticate("Bearer sk-user"), ring.authenticate("Bearer sk-admin")
    assert ring.is_admin(admin) and not ring.is_admin(user) and not ring.is_admin(None)


def test_without_keys_auth_is_off_and_every_caller_is_one_tenant():
    ring = KeyRing([], admin_keys=[""])
    assert not ring.enabled and ring.authenticate(None) is None
    assert tenant_id(None) == ""
    # A cache_salt without a key narrows sharing inside that one tenant, the unsalted one.
    salt = tenant_salt(None, "conv-1")
    assert salt is not None and salt.partition(TENANT_SEPARATOR)[0] == ""
    assert tenant_salt(None, None) is None and tenant_salt(None, "") is None


def test_a_key_that_is_not_valid_utf8_still_works():
    # Command-line arguments carry undecodable bytes as lone surrogates.
    ring = KeyRing(["sk-\udcff"])
    assert ring.authenticate("Bearer sk-\udcff") is not None
    assert tenant_salt(None, "conv-\udcff") != tenant_salt(None, "conv-")


def test_tenant_ids_and_salts_keep_their_format():
    # Salts name the disk tier's entries: a changed recipe strands every file on disk.
    tid = "b189ef9ab4df99ab0c77d6b1f3c5183e"
    assert tenant_id(TENANT) == tid
    assert tenant_salt(TENANT, None) == tid + ":"
    assert tenant_salt(TENANT, "conv-1") == (
        tid + ":18adca9f68f7e8a74734540f3d9e1eaf4f10f29f495bae3ba53edee541dc2578"
    )
    assert tenant_salt(None, "conv-1") == (
        ":6247753d6a8a699dd28dc4dbd023b4639e6762f45d5de182cd6dcb62c115f97f"
    )


def test_keys_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-a\n\n   sk-b  \n  # old: sk-c\n", encoding="utf-8")
    assert read_keys_file(path) == ["sk-a", "sk-b"]
    assert read_keys_file(str(path)) == ["sk-a", "sk-b"]
