"""``prefixcache serve``: wrap an engine, print where and what it serves, run uvicorn."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import TextIO

import uvicorn

from prefixcache import Engine
from prefixcache.client import EngineLimits, InProcessEngineClient, ResponseStore
from server.app import DEFAULT_MAX_QUEUE, create_app
from server.background import bind_socket


def serve(
    engine: Engine,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Sequence[str] = (),
    admin_api_keys: Sequence[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    log_level: str = "info",
    random_weights: bool = False,
    responses_dir: str | None = None,
) -> None:
    """Serve ``engine`` over HTTP until interrupted (Ctrl-C or SIGTERM).

    ``random_weights`` says so in the startup banner (the embedded default model).
    ``responses_dir`` keeps the Responses API's stored conversations there, so they
    survive a restart (without it: next to the disk KV tier if any, else in memory).
    """
    client = InProcessEngineClient(engine)
    try:
        store = ResponseStore(folder=responses_dir) if responses_dir is not None else None
        app = create_app(
            client,
            model_name=model_name,
            api_keys=api_keys,
            admin_api_keys=admin_api_keys,
            max_queue=max_queue,
            response_store=store,
        )
        sock = bind_socket(host, port)
        bound_port = sock.getsockname()[1]
        keys = len(set(api_keys) | set(admin_api_keys))
        print_banner(client.limits, model_name, host, bound_port, keys, random_weights)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: that is the normal end.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        client.shutdown()


def print_banner(
    limits: EngineLimits,
    model_name: str,
    host: str,
    port: int,
    num_keys: int,
    random_weights: bool,
    out: TextIO | None = None,
) -> None:
    """Print the URL, model, device, backend and cache sizes the server runs with."""
    out = out or sys.stdout
    config = limits
    shown_host = f"[{host}]" if ":" in host else host
    caching = "on" if config.prefix_caching else "off"
    weights = "RANDOM weights: its text is gibberish" if random_weights else config.model
    auth = f"{num_keys} API key(s), one prefix-cache namespace each" if num_keys else "off"
    disk = config.disk_cache_dir or "off"
    num_blocks = config.kv_cache_tokens // config.block_size
    lines = [
        f"prefixcache serving at http://{shown_host}:{port}/v1 (OpenAI-compatible)",
        f"  model       {model_name} ({weights})",
        f"  device      {config.device}, {config.dtype}, "
        f"attention backend {config.attention_backend}",
        f"  context     max_model_len {config.max_model_len} tokens",
        f"  KV cache    {config.kv_cache_tokens} tokens ({num_blocks} blocks of "
        f"{config.block_size}), prefix caching {caching}",
        f"  host cache  {config.host_cache_tokens} tokens; disk cache {disk}",
        f"  batching    max_num_seqs {config.max_num_seqs}, "
        f"max_num_batched_tokens {config.max_num_batched_tokens}",
        f"  auth        {auth}",
        f"  try         curl http://{shown_host}:{port}/v1/models",
    ]
    print("\n".join(lines), file=out, flush=True)
