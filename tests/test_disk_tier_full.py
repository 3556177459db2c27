"""A full disk under the disk KV tier: requests go on, and the log says so once a minute."""

from __future__ import annotations

import errno
import logging
import os

from prefixcache import Engine, SamplingParams


def test_a_full_disk_fails_no_request_and_warns_once_with_a_count(
    tiny_llama, tmp_path, monkeypatch, caplog
):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # every rename into place fails
    engine = Engine.from_pretrained(
        str(tiny_llama), device="cpu", dtype="float32", kv_cache_tokens=4096,
        chunk_size=64, disk_cache_dir=tmp_path,
    )  # fmt: skip
    prompts = [[3 + (s * 31 + i) % 600 for i in range(300)] for s in range(4)]
    with caplog.at_level(logging.WARNING, logger="prefixcache.tiers.disk"):
        outs = engine.generate(prompts, SamplingParams(max_tokens=2))
        engine.generate(prompts[0] + [5, 6], SamplingParams(max_tokens=2))
    assert all(len(out.token_ids) == 2 for out in outs)
    warnings = [r for r in caplog.records if "could not write KV chunk file" in r.getMessage()]
    stats = engine.stats()
    assert stats["disk_failures"] >= 16  # every chunk of every prompt failed to land
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no temp file left behind
    engine.check_integrity()
