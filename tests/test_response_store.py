"""``ResponseStore`` on its own: bounds, scopes, expiry and the folder, without a model.

Every test drives a real store (a real folder under ``tmp_path`` where one is needed)
with a settable clock, so expiry is exact and nothing waits.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from prefixcache.apps.response_store import ResponseNotStored, ResponseStore, StoredResponse

LOGGER = "prefixcache.apps.response_store"


class Clock:
    """Seconds since the epoch, set by the test."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _entry(rid: str, tokens: int = 4, scope: str = "", created_at: float = 1000.0, **kw):
    return StoredResponse(
        id=rid,
        scope=scope,
        created_at=created_at,
        messages=[{"role": "user", "content": "hi"}],
        text="hi",
        tokens=np.arange(tokens, dtype=np.int32).tobytes(),
        output_text="hello",
        **kw,
    )


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------- the entry


def test_an_entry_defaults_to_no_instructions_no_history_and_zero_counts():
    entry = _entry("resp_a")
    assert entry.instructions is None and entry.previous_response_id is None
    assert entry.finish_reason is None and entry.tools is None
    assert (entry.num_input_tokens, entry.num_cached_tokens, entry.num_output_tokens) == (0, 0, 0)


def test_an_entry_reads_its_tokens_as_int32_ids():
    entry = _entry("resp_a", tokens=5)
    assert entry.token_ids.dtype == np.int32
    assert entry.token_ids.tolist() == [0, 1, 2, 3, 4]
    assert entry.num_tokens == 5 and isinstance(entry.num_tokens, int)


# -------------------------------------------------------------- construction


def test_the_default_bounds_are_ten_thousand_entries_fifty_million_tokens_thirty_days():
    store = ResponseStore()
    assert (store.max_entries, store.max_tokens) == (10_000, 50_000_000)
    assert store.ttl_s == 30 * 24 * 3600.0
    assert (store.max_entries_per_scope, store.max_tokens_per_scope) == (10_000, 50_000_000)
    assert store.folder is None and len(store) == 0 and store.num_tokens == 0


def test_the_default_clock_is_the_epoch_so_a_fresh_entry_is_live():
    store = ResponseStore()
    store.put(_entry("resp_now", created_at=time.time()))
    assert store.get("resp_now", "") is not None
    store.put(_entry("resp_old", created_at=time.time() - 31 * 24 * 3600))
    assert store.get("resp_old", "") is None


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"max_entries": 0}, "max_entries must be >= 1, got 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_entries_per_scope": -1}, "max_entries_per_scope must be >= 1, got -1"),
        ({"max_tokens_per_scope": -2}, "max_tokens_per_scope must be >= 1, got -2"),
        ({"ttl_s": 0}, "ttl_s must be > 0, got 0"),
        ({"ttl_s": -1.5}, "ttl_s must be > 0, got -1.5"),
        ({"ttl_s": float("nan")}, "ttl_s must be > 0, got nan"),
    ],
)
def test_bad_bounds_are_refused_with_a_message_naming_them(bounds, message, tmp_path):
    folder = tmp_path / "store"
    with pytest.raises(ValueError) as refused:
        ResponseStore(folder=folder, **bounds)
    assert str(refused.value) == message
    assert not folder.exists()  # refused before touching the disk


def test_the_smallest_bounds_are_accepted():
    store = ResponseStore(max_entries=1, max_tokens=1, ttl_s=1e-9, clock=Clock())
    assert (store.max_entries_per_scope, store.max_tokens_per_scope) == (1, 1)


def test_per_scope_bounds_default_to_the_totals_and_never_exceed_them():
    store = ResponseStore(max_entries=10, max_tokens=100)
    assert (store.max_entries_per_scope, store.max_tokens_per_scope) == (10, 100)
    store = ResponseStore(
        max_entries=10, max_tokens=100, max_entries_per_scope=50, max_tokens_per_scope=500
    )
    assert (store.max_entries_per_scope, store.max_tokens_per_scope) == (10, 100)
    store = ResponseStore(
        max_entries=10, max_tokens=100, max_entries_per_scope=3, max_tokens_per_scope=30
    )
    assert (store.max_entries_per_scope, store.max_tokens_per_scope) == (3, 30)


def test_a_folder_is_created_with_its_parents(tmp_path):
    folder = tmp_path / "a" / "b"
    store = ResponseStore(folder=str(folder))
    assert folder.is_dir() and store.folder == folder
    ResponseStore(folder=folder)  # an existing folder is fine


# ------------------------------------------------------- put, get and delete


def test_usage_counts_entries_and_tokens_per_scope():
    store = ResponseStore(clock=Clock())
    store.put(_entry("resp_a", 3, scope="a"))
    store.put(_entry("resp_b", 5, scope="a"))
    store.put(_entry("resp_c", 7, scope="b"))
    assert store.usage("a") == (2, 8) and store.usage("b") == (1, 7)
    assert store.usage("nobody") == (0, 0)
    assert len(store) == 3 and store.num_tokens == 15


def test_an_entry_exactly_at_the_per_scope_token_bound_is_kept_and_one_over_is_not(caplog):
    store = ResponseStore(max_tokens=100, max_tokens_per_scope=10, clock=Clock())
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert store.put(_entry("resp_fits", 10)) is True
    assert store.get("resp_fits", "") is not None
    assert store.put(_entry("resp_over", 11)) is False
    assert store.get("resp_over", "") is None and store.num_tokens == 10
    assert [r.getMessage() for r in caplog.records] == [
        "response resp_over (11 tokens) is over the store's token bound"
    ]


def test_putting_an_id_again_replaces_the_entry_and_its_counts():
    store = ResponseStore(clock=Clock())
    store.put(_entry("resp_a", 3, scope="a"))
    store.put(_entry("resp_a", 5, scope="a"))
    assert store.usage("a") == (1, 5) and store.num_tokens == 5 and len(store) == 1
    assert store.get("resp_a", "a").num_tokens == 5


def test_putting_an_id_again_under_another_scope_moves_it():
    store = ResponseStore(clock=Clock())
    store.put(_entry("resp_a", 3, scope="a"))
    store.put(_entry("resp_a", 5, scope="b"))
    assert store.get("resp_a", "a") is None and store.get("resp_a", "b") is not None
    assert store.usage("a") == (0, 0) and store.usage("b") == (1, 5)
    assert set(store._scopes) == {"b"}  # the emptied scope leaves nothing behind


def test_a_lookup_under_another_scope_finds_nothing_and_deletes_nothing():
    store = ResponseStore(clock=Clock())
    store.put(_entry("resp_a", scope="a"))
    assert store.get("resp_a", "b") is None
    assert store.delete("resp_a", "b") is False
    assert store.get("resp_a", "a") is not None


def test_delete_forgets_one_entry_and_keeps_its_scopes_others():
    store = ResponseStore(clock=Clock())
    store.put(_entry("resp_a", 3, scope="a"))
    store.put(_entry("resp_b", 5, scope="a"))
    assert store.delete("resp_a", "a") is True
    assert store.delete("resp_a", "a") is False
    assert store.get("resp_b", "a") is not None
    assert store.usage("a") == (1, 5) and store.num_tokens == 5
    assert store.delete("resp_b", "a") is True
    assert store._scopes == {} and store.num_tokens == 0 and len(store) == 0


def test_an_entry_expires_exactly_at_its_ttl():
    clock = Clock(1000.0)
    store = ResponseStore(ttl_s=60, clock=clock)
    store.put(_entry("resp_a", 4, created_at=1000.0))
    clock.now = 1059.5
    assert store.get("resp_a", "") is not None
    clock.now = 1060.0
    assert store.get("resp_a", "") is None
    assert len(store) == 0 and store.num_tokens == 0 and store.usage("") == (0, 0)


def test_an_expired_entry_is_dropped_even_when_asked_for_under_another_scope():
    clock = Clock(1000.0)
    store = ResponseStore(ttl_s=60, clock=clock)
    store.put(_entry("resp_a", 4, scope="a"))
    clock.now = 2000.0
    assert store.get("resp_a", "b") is None
    assert len(store) == 0 and store.num_tokens == 0


def test_an_expired_entry_cannot_be_deleted():
    clock = Clock(1000.0)
    store = ResponseStore(ttl_s=60, clock=clock)
    store.put(_entry("resp_a"))
    clock.now = 2000.0
    assert store.delete("resp_a", "") is False and len(store) == 0


def test_a_put_drops_every_expired_entry_of_every_scope():
    clock = Clock(1000.0)
    store = ResponseStore(ttl_s=60, clock=clock)
    store.put(_entry("resp_a", 3, scope="a", created_at=1000.0))
    store.put(_entry("resp_b", 5, scope="b", created_at=1000.0))
    clock.now = 1100.0
    store.put(_entry("resp_c", 7, scope="c", created_at=1100.0))
    assert len(store) == 1 and store.num_tokens == 7
    assert set(store._scopes) == {"c"}


# ------------------------------------------------------------------- bounds


def test_a_scope_over_its_entry_bound_loses_its_least_recently_used():
    store = ResponseStore(max_entries=100, max_entries_per_scope=2, clock=Clock())
    store.put(_entry("resp_other", scope="b"))
    store.put(_entry("resp_1", scope="a"))
    store.put(_entry("resp_2", scope="a"))
    assert store.get("resp_1", "a") is not None  # resp_2 is now the least recently used
    store.put(_entry("resp_3", scope="a"))
    assert store.get("resp_2", "a") is None
    assert store.get("resp_1", "a") is not None and store.get("resp_3", "a") is not None
    assert store.get("resp_other", "b") is not None and store.usage("a") == (2, 8)


def test_a_scope_exactly_at_its_bounds_loses_nothing():
    store = ResponseStore(max_entries_per_scope=2, max_tokens_per_scope=8, clock=Clock())
    store.put(_entry("resp_1", 4))
    store.put(_entry("resp_2", 4))
    assert store.usage("") == (2, 8)
    store.put(_entry("resp_3", 1))
    assert store.get("resp_1", "") is None and store.usage("") == (2, 5)


def test_a_scope_over_its_token_bound_loses_entries_until_it_fits():
    store = ResponseStore(max_tokens=1000, max_tokens_per_scope=10, clock=Clock())
    store.put(_entry("resp_1", 4))
    store.put(_entry("resp_2", 4))
    store.put(_entry("resp_3", 9))
    assert store.usage("") == (1, 9) and store.get("resp_3", "") is not None


def test_over_the_total_entries_the_scope_holding_the_most_entries_gives_way():
    store = ResponseStore(max_entries=4, max_tokens=1000, clock=Clock())
    store.put(_entry("resp_a1", 50, scope="a"))
    for i in range(3):
        store.put(_entry(f"resp_b{i}", 1, scope="b"))
    store.put(_entry("resp_c", 1, scope="c"))
    # b holds the most entries (a the most tokens): b's oldest goes.
    assert store.get("resp_b0", "b") is None
    assert store.usage("a") == (1, 50) and store.usage("b") == (2, 2)
    assert store.usage("c") == (1, 1) and len(store) == 4


def test_over_the_total_tokens_the_scope_holding_the_most_tokens_gives_way():
    store = ResponseStore(max_entries=100, max_tokens=20, clock=Clock())
    store.put(_entry("resp_a1", 9, scope="a"))
    store.put(_entry("resp_a2", 1, scope="a"))
    for i in range(3):
        store.put(_entry(f"resp_b{i}", 2, scope="b"))
    store.put(_entry("resp_c", 5, scope="c"))  # 21 tokens in all
    # b holds the most entries, a the most tokens: a's oldest goes, and then it fits.
    assert store.get("resp_a1", "a") is None and store.get("resp_a2", "a") is not None
    assert store.usage("b") == (3, 6) and store.num_tokens == 12


def test_the_total_exactly_at_its_bounds_loses_nothing():
    store = ResponseStore(max_entries=3, max_tokens=12, clock=Clock())
    for i in range(3):
        store.put(_entry(f"resp_{i}", 4, scope=str(i)))
    assert len(store) == 3 and store.num_tokens == 12


# ------------------------------------------------------------------ folder


def test_each_entry_is_one_file_named_for_its_id(tmp_path):
    store = ResponseStore(folder=tmp_path, clock=Clock())
    store.put(_entry("resp_a", 3, scope="a", instructions="be brief", finish_reason="stop"))
    assert _files(tmp_path) == ["resp_a.msgpack"]
    data = (tmp_path / "resp_a.msgpack").read_bytes()
    assert msgspec.msgpack.decode(data, type=StoredResponse) == store.get("resp_a", "a")


def test_a_restart_loads_every_entry_with_its_scope_and_counts(tmp_path):
    clock = Clock()
    store = ResponseStore(folder=tmp_path, clock=clock)
    store.put(_entry("resp_a", 3, scope="a", num_output_tokens=2))
    store.put(_entry("resp_b", 5, scope="b"))
    again = ResponseStore(folder=tmp_path, clock=clock)
    assert again.get("resp_a", "a") == store.get("resp_a", "a")
    assert again.get("resp_a", "b") is None
    assert again.usage("a") == (1, 3) and again.usage("b") == (1, 5) and again.num_tokens == 8


def test_putting_an_id_again_keeps_its_file_with_the_new_entry(tmp_path):
    clock = Clock()
    store = ResponseStore(folder=tmp_path, clock=clock)
    store.put(_entry("resp_a", 3))
    store.put(_entry("resp_a", 6))
    assert _files(tmp_path) == ["resp_a.msgpack"]
    assert ResponseStore(folder=tmp_path, clock=clock).get("resp_a", "").num_tokens == 6


def test_delete_and_eviction_and_expiry_remove_the_files(tmp_path):
    clock = Clock(1000.0)
    store = ResponseStore(max_entries=2, ttl_s=60, folder=tmp_path, clock=clock)
    store.put(_entry("resp_1"))
    store.put(_entry("resp_2"))
    store.put(_entry("resp_3"))  # evicts resp_1
    assert _files(tmp_path) == ["resp_2.msgpack", "resp_3.msgpack"]
    store.delete("resp_2", "")
    assert _files(tmp_path) == ["resp_3.msgpack"]
    clock.now = 2000.0
    assert store.get("resp_3", "") is None
    assert _files(tmp_path) == []


def test_a_file_already_gone_does_not_stop_a_delete(tmp_path):
    store = ResponseStore(folder=tmp_path, clock=Clock())
    store.put(_entry("resp_a"))
    (tmp_path / "resp_a.msgpack").unlink()
    assert store.delete("resp_a", "") is True and len(store) == 0


def test_a_file_that_cannot_be_removed_does_not_stop_a_delete(tmp_path):
    store = ResponseStore(folder=tmp_path, clock=Clock())
    store.put(_entry("resp_a"))
    path = tmp_path / "resp_a.msgpack"
    path.unlink()
    path.mkdir()  # unlink() of a folder fails with an OSError
    assert store.delete("resp_a", "") is True and len(store) == 0


def test_a_restart_keeps_the_newest_entries_within_the_bounds(tmp_path):
    clock = Clock(1000.0)
    store = ResponseStore(folder=tmp_path, clock=clock)
    for i, created in enumerate((1003.0, 1001.0, 1002.0)):
        store.put(_entry(f"resp_{i}", 4, created_at=created))
    again = ResponseStore(max_entries=2, folder=tmp_path, clock=clock)
    assert again.get("resp_1", "") is None  # the oldest by creation, not by name
    assert again.get("resp_0", "") is not None and again.get("resp_2", "") is not None
    assert _files(tmp_path) == ["resp_0.msgpack", "resp_2.msgpack"]


def test_a_restart_drops_entries_that_expired_meanwhile(tmp_path):
    clock = Clock(1000.0)
    ResponseStore(ttl_s=60, folder=tmp_path, clock=clock).put(_entry("resp_a"))
    clock.now = 1060.0
    again = ResponseStore(ttl_s=60, folder=tmp_path, clock=clock)
    assert len(again) == 0 and _files(tmp_path) == []


def test_a_restart_skips_unreadable_and_misnamed_files_and_removes_temporaries(tmp_path, caplog):
    clock = Clock()
    ResponseStore(folder=tmp_path, clock=clock).put(_entry("resp_good"))
    (tmp_path / "resp_bad.msgpack").write_bytes(b"\xc1 not msgpack")
    (tmp_path / "resp_alias.msgpack").write_bytes((tmp_path / "resp_good.msgpack").read_bytes())
    (tmp_path / "resp_half.tmp").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"left alone")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    again = ResponseStore(folder=tmp_path, clock=clock)
    assert len(again) == 1 and again.get("resp_good", "") is not None
    assert "resp_half.tmp" not in _files(tmp_path) and "notes.txt" in _files(tmp_path)
    [warning] = [r.getMessage() for r in caplog.records]
    bad = tmp_path / "resp_bad.msgpack"
    assert warning.startswith(f"skipping unreadable stored response {bad}: ")
    assert "DecodeError(" in warning  # the reason, for whoever reads the log


def test_a_restart_enforces_the_per_scope_bounds(tmp_path):
    clock = Clock()
    store = ResponseStore(folder=tmp_path, clock=clock)
    for i in range(3):
        store.put(_entry(f"resp_a{i}", 4, scope="a", created_at=1000.0 + i))
    store.put(_entry("resp_b", 4, scope="b", created_at=1000.5))
    again = ResponseStore(max_entries_per_scope=2, folder=tmp_path, clock=clock)
    assert again.usage("a") == (2, 8) and again.usage("b") == (1, 4)
    assert again.get("resp_a0", "a") is None and again.get("resp_a2", "a") is not None


def test_a_leftover_temporary_that_cannot_be_removed_does_not_stop_a_start(tmp_path):
    ResponseStore(folder=tmp_path, clock=Clock()).put(_entry("resp_a"))
    (tmp_path / "resp_stuck.tmp").mkdir()  # unlink() of a folder fails with an OSError
    again = ResponseStore(folder=tmp_path, clock=Clock())
    assert again.get("resp_a", "") is not None


def test_a_temporary_that_cannot_be_removed_does_not_hide_the_failed_write(tmp_path, monkeypatch):
    store = ResponseStore(folder=tmp_path, clock=Clock())

    def write_bytes(path: Path, data: bytes) -> int:
        path.mkdir()  # what is left cannot be unlinked either
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(ResponseNotStored) as failed:
        store.put(_entry("resp_a"))
    assert failed.value.disk_full and len(store) == 0


def test_a_restart_skips_a_file_it_cannot_read(tmp_path, caplog):
    clock = Clock()
    ResponseStore(folder=tmp_path, clock=clock).put(_entry("resp_good"))
    (tmp_path / "resp_dir.msgpack").mkdir()  # reading it fails with an OSError
    caplog.set_level(logging.WARNING, logger=LOGGER)
    again = ResponseStore(folder=tmp_path, clock=clock)
    assert len(again) == 1 and len(caplog.records) == 1


def _failing_write(monkeypatch, err: int, strerror: str | None) -> list[Path]:
    """Every ``Path.write_bytes`` creates its file and then fails with ``err``."""
    written = []

    def write_bytes(path: Path, data: bytes) -> int:
        written.append(path)
        path.touch()
        raise OSError(err, strerror) if strerror is not None else OSError(err)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return written


@pytest.mark.parametrize(
    ("err", "strerror", "disk_full", "message"),
    [
        (errno.ENOSPC, "No space left on device", True, "the disk is full"),
        (errno.EDQUOT, "Disk quota exceeded", True, "the disk is full"),
        (errno.EACCES, "Permission denied", False, "Permission denied"),
        (errno.EIO, None, False, "a write error"),
    ],
)
def test_a_failed_write_says_why_and_keeps_nothing(
    tmp_path, monkeypatch, caplog, err, strerror, disk_full, message
):
    store = ResponseStore(folder=tmp_path, clock=Clock())
    store.put(_entry("resp_kept", 3))
    written = _failing_write(monkeypatch, err, strerror)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(ResponseNotStored) as failed:
        store.put(_entry("resp_new", 5))
    assert str(failed.value) == f"the response was not stored: {message}"
    assert failed.value.disk_full is disk_full and failed.value.response_id == "resp_new"
    assert isinstance(failed.value.__cause__, OSError)
    assert written == [tmp_path / "resp_new.tmp"]
    assert _files(tmp_path) == ["resp_kept.msgpack"]
    assert len(store) == 1 and store.num_tokens == 3 and store.get("resp_new", "") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot store response resp_new: {failed.value.__cause__}"
    ]
    assert f"{err}" in caplog.records[0].getMessage()  # the error itself is logged


def test_a_failed_replace_removes_the_temporary_file_and_keeps_the_old_entry(tmp_path, monkeypatch):
    store = ResponseStore(folder=tmp_path, clock=Clock())
    store.put(_entry("resp_a", 3))

    def replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ResponseNotStored):
        store.put(_entry("resp_a", 6))
    assert _files(tmp_path) == ["resp_a.msgpack"]
    assert store.get("resp_a", "").num_tokens == 3


def test_write_failures_are_warned_about_at_most_once_a_minute():
    assert ResponseStore()._warn.interval == 60.0
