"""``kv_store`` / ``--kv-store``: checked once, placed after the local tiers, and an
unreachable Redis at start is a miss, not an error."""

from __future__ import annotations

import random

import pytest
from redis_server import free_port

from prefixcache import Engine, SamplingParams, cli
from prefixcache.config import EngineConfig
from tests.test_server_cli import SMALL, captured_serve  # noqa: F401  (a fixture)

pytest.importorskip("redis", reason="the redis package is missing (prefixcache[cluster])")


def _config(**kwargs) -> EngineConfig:
    return EngineConfig(model="m", device="cpu", dtype="float32", max_model_len=512, **kwargs)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "redis://", "redis://host/db0", "redis://host:0/0", "unix://", 42],
)
def test_a_bad_kv_store_url_is_refused_naming_it(url):
    with pytest.raises(ValueError, match="kv_store") as caught:
        _config(kv_store=url)
    assert repr(url) in str(caught.value) or str(url) in str(caught.value)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://cache.internal", "unix:///run/redis.sock"]
)
def test_redis_urls_are_accepted(url):
    assert _config(kv_store=url).kv_store == url


def test_the_redis_tier_sits_after_host_and_disk_and_needs_kv_store(tiny_llama, tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    engine = Engine.from_pretrained(
        str(tiny_llama),
        device="cpu",
        kv_cache_tokens=4096,
        host_cache_tokens=1024,
        disk_cache_dir=str(tmp_path),
        kv_store=url,
    )
    assert [t.name for t in engine.core.blocks.tiers.tiers] == ["host", "disk", "redis"]
    with pytest.raises(ValueError, match="needs kv_store"):
        Engine.from_pretrained(str(tiny_llama), device="cpu", kv_tiers=("redis",))
    with pytest.raises(ValueError, match="kv_store adds already"):
        Engine.from_pretrained(str(tiny_llama), device="cpu", kv_store=url, kv_tiers=("redis",))


def test_an_unreachable_redis_is_a_miss_and_a_counted_failure(tiny_llama):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    options = dict(device="cpu", dtype="float32", kv_cache_tokens=4096, chunk_size=64)
    engine = Engine.from_pretrained(str(tiny_llama), kv_store=url, **options)
    plain = Engine.from_pretrained(str(tiny_llama), enable_prefix_caching=False, **options)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 700) for _ in range(200)]
    params = SamplingParams(max_tokens=3)
    expected = plain.generate(prompt, params)[0].token_ids
    assert engine.generate(prompt, params)[0].token_ids == expected
    assert engine.stats()["redis_failures"] >= 1


def test_serve_passes_kv_store_through(captured_serve, tiny_llama):  # noqa: F811
    url = f"redis://127.0.0.1:{free_port()}/3"
    assert cli.main(["serve", "--model", str(tiny_llama), *SMALL, "--kv-store", url]) == 0
    (model, options, _), = captured_serve  # fmt: skip
    assert options["kv_store"] == url
    engine = Engine.from_pretrained(model, **options)  # as serve would start it
    assert engine.core.blocks.tiers.tier("redis").link.url == url
