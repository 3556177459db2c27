"""``prefixcache serve --replicas N``: the Serve application on a Ray cluster.

Joins the cluster at ``ray_address`` when given, else starts a local Ray instance
(``ray.init``), deploys ``build_app`` behind Serve's HTTP proxy on ``host:port``,
prints where it serves, and runs until interrupted; then it deletes the application
(and stops the local Ray instance it started).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Any

from prefixcache.cluster.app import DEFAULT_APP_NAME, ClusterOptions, build_app


def start_ray(ray_address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray; True when this started a local instance (that it should stop)."""
    import ray

    if ray.is_initialized():
        return False
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def deploy(
    engine_options: dict[str, Any],
    *,
    model_name: str,
    cluster: ClusterOptions,
    host: str,
    port: int,
    app_options: dict[str, Any] | None = None,
    responses_dir: str | None = None,
    app_name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
):
    """Start Serve's proxy on ``host:port`` (if not started) and run the application
    at ``route_prefix``; returns the replica deployment's handle once every replica
    is up."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    app = build_app(
        engine_options,
        model_name=model_name,
        cluster=cluster,
        app_options=app_options,
        responses_dir=responses_dir,
    )
    serve.run(app, name=app_name, route_prefix=route_prefix)
    return serve.get_deployment_handle("EngineReplica", app_name=app_name)


def serve_cluster(
    engine_options: dict[str, Any],
    *,
    model_name: str,
    cluster: ClusterOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
    app_options: dict[str, Any] | None = None,
    responses_dir: str | None = None,
    random_weights: bool = False,
) -> None:
    """Serve the replicas over HTTP until SIGINT or SIGTERM."""
    import ray
    from ray import serve

    from server.launch import print_banner

    if port == 0:  # Serve's proxy needs a fixed port: pick a free one, as uvicorn would
        port = _free_port(host)
    started = start_ray(ray_address, ray_num_cpus)
    try:
        replicas = deploy(
            engine_options,
            model_name=model_name,
            cluster=cluster,
            host=host,
            port=port,
            app_options=app_options,
            responses_dir=responses_dir,
        )
        limits = replicas.limits.remote().result()
        keys = app_options.get("api_keys", ()) if app_options else ()
        print_banner(limits, model_name, host, port, len(set(keys)), random_weights)
        print(
            f"  replicas    {cluster.num_replicas} on Ray "
            f"({ray_address or 'a local instance'}), router {cluster.router}",
            flush=True,
        )
        _wait_for_signal()
    finally:
        with contextlib.suppress(Exception):
            serve.delete(DEFAULT_APP_NAME)
        if started:
            serve.shutdown()
            ray.shutdown()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
