"""``prefixcache serve``: wrap an engine, print where and what it serves, run uvicorn."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

import uvicorn

from prefixcache.client import (
    EngineLimits,
    InProcessEngineClient,
    ProcessEngineClient,
    ResponseStore,
)
from server.app import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    create_app,
)
from server.background import bind_socket
from server.state import Drain

logger = logging.getLogger(__name__)
# After the drain, uvicorn's own grace for connections to close: the cut streams end
# at once, so this only bounds a client that does not read its last bytes.
_CLOSE_GRACE_S = 5


class DrainingServer(uvicorn.Server):
    """uvicorn, with a graceful drain on the first SIGTERM or SIGINT.

    The socket stays open during the drain so that new requests get a 503 with
    ``Retry-After`` (not a refused connection); running requests get the drain's
    timeout to finish; then the streams still open are ended with an error event and
    ``[DONE]``, and uvicorn shuts down as usual. A second signal skips the wait.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.drain: Drain = config.app.state.server.drain  # a ``create_app`` app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Begin the drain (runs in the signal handler: it only sets flags)."""
        if self.drain.draining:
            super().handle_exit(sig, frame)
            return
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's periodic check; ends the drain when it is done or out of time."""
        drain = self.drain
        if drain.draining and not self.should_exit and drain.finished():
            left = drain.admission.in_flight
            if left:
                logger.warning("shutdown timeout: ending %d request(s) still running", left)
            drain.cut.set()
            self.should_exit = True
        return await super().on_tick(counter)


ENGINE_DIED_EXIT_CODE = 1  # so a supervisor (systemd, Kubernetes) restarts the server


def serve(
    model: str,
    engine_options: dict,
    *,
    engine_in_process: bool = False,
    log_level: str = "info",
    **server_options,
) -> None:
    """Serve ``model`` over HTTP until interrupted (see ``serve_client``).

    The engine (``Engine.from_pretrained(model, **engine_options)``) runs in its own
    process (``ProcessEngineClient``), so the HTTP process only parses, tokenizes and
    streams; ``engine_in_process`` keeps it on a thread of this process instead. The
    banner is printed once the engine is loaded.
    """
    client = start_engine(model, engine_options, engine_in_process, log_level)
    serve_client(client, log_level=log_level, **server_options)


def serve_client(
    client: InProcessEngineClient | ProcessEngineClient,
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
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    metrics_api_key: str | None = None,
) -> None:
    """Serve the engine behind ``client`` over HTTP until interrupted (Ctrl-C or
    SIGTERM); the client is shut down after.

    If the engine stops the server stops at once and this raises
    ``SystemExit(ENGINE_DIED_EXIT_CODE)``: a process that cannot generate any more
    should end, not answer 503 forever.

    ``random_weights`` says so in the startup banner (the embedded default model).
    ``responses_dir`` keeps the Responses API's stored conversations there, so they
    survive a restart (without it: next to the disk KV tier if any, else in memory).
    On SIGTERM or SIGINT the server drains (``DrainingServer``): running requests get
    ``shutdown_timeout`` seconds. ``request_timeout`` and ``metrics_api_key``: see
    ``create_app``.
    """
    try:
        store = ResponseStore(folder=responses_dir) if responses_dir is not None else None
        app = create_app(
            client,
            model_name=model_name,
            api_keys=api_keys,
            admin_api_keys=admin_api_keys,
            max_queue=max_queue,
            response_store=store,
            request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout,
            metrics_api_key=metrics_api_key,
        )
        sock = bind_socket(host, port)
        bound_port = sock.getsockname()[1]
        keys = len(set(api_keys) | set(admin_api_keys))
        print_banner(client.limits, model_name, host, bound_port, keys, random_weights)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=_CLOSE_GRACE_S)
        server = DrainingServer(config)
        _stop_when_engine_stops(server, client)
        # A second Ctrl-C makes uvicorn re-raise it: still a normal end.
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
        if not client.is_alive:
            logger.error("the engine stopped; exiting with status %d", ENGINE_DIED_EXIT_CODE)
            raise SystemExit(ENGINE_DIED_EXIT_CODE)
    finally:
        client.shutdown()


def start_engine(
    model: str, options: dict, in_process: bool, log_level: str = "warning"
) -> InProcessEngineClient | ProcessEngineClient:
    """The engine's client once the engine is loaded: in a child process, or in this one."""
    if in_process:
        return InProcessEngineClient.start(model, **options)
    level = "DEBUG" if log_level == "trace" else log_level.upper()
    return ProcessEngineClient.start(model, log_level=level, **options)


def _stop_when_engine_stops(
    server: uvicorn.Server, client: InProcessEngineClient | ProcessEngineClient
) -> None:
    """Ask ``server`` to exit, as a signal would, once the engine's loop has stopped."""

    def watch() -> None:
        client.wait_stopped()
        server.should_exit = True  # uvicorn's main loop checks it on every tick

    threading.Thread(target=watch, name="prefixcache-engine-watch", daemon=True).start()


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
        f"  KV dtype    {config.kv_cache_dtype}, {config.kv_bytes_per_token} bytes per token "
        "(all layers, scales included)",
        f"  host cache  {config.host_cache_tokens} tokens; disk cache {disk}",
        f"  batching    max_num_seqs {config.max_num_seqs}, "
        f"max_num_batched_tokens {config.max_num_batched_tokens}",
        f"  auth        {auth}",
        f"  try         curl http://{shown_host}:{port}/v1/models",
    ]
    print("\n".join(lines), file=out, flush=True)
