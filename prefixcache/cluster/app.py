"""The Serve application: an ingress serving the OpenAI-compatible app over replicas.

``build_app`` returns a Serve application for ``serve.run`` (or a user's own Serve
config): one ``Ingress`` replica runs ``server.app.create_app`` over a
``RemoteEngineClient`` (tokenizing once), and ``num_replicas`` ``EngineReplica``s run
the engines, routed by ``PrefixAffinityRouter`` (or Serve's default router, for
comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from prefixcache.cluster.affinity import DEFAULT_IMBALANCE_THRESHOLD
from prefixcache.cluster.remote_client import RemoteEngineClient
from prefixcache.cluster.replica import EngineReplica
from prefixcache.cluster.router import PrefixAffinityRouter

ROUTERS = ("affinity", "default")
DEFAULT_APP_NAME = "prefixcache"
ROUTING_STATS_PERIOD_S = 0.5  # how soon routers hear of evictions
HEALTH_CHECK_PERIOD_S = 2.0  # how soon a replica whose engine died is replaced


@dataclass(frozen=True)
class ClusterOptions:
    """How the replicas are deployed and routed.

    ``replica_cpus``: Ray CPUs each replica reserves (its torch threads follow).
    ``max_ongoing_requests``: requests Serve sends one replica at once (None: the
    engine's ``max_num_seqs``).
    """

    num_replicas: int = 2
    router: str = "affinity"
    imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD
    replica_cpus: float = 1.0
    max_ongoing_requests: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_replicas, int) or self.num_replicas <= 0:
            raise ValueError(f"num_replicas must be a positive integer, got {self.num_replicas!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if not isinstance(self.imbalance_threshold, int) or self.imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be >= 0, got {self.imbalance_threshold!r}")
        if not self.replica_cpus >= 0:
            raise ValueError(f"replica_cpus must be >= 0, got {self.replica_cpus!r}")
        ongoing = self.max_ongoing_requests
        if ongoing is not None and (not isinstance(ongoing, int) or ongoing <= 0):
            raise ValueError(f"max_ongoing_requests must be a positive integer, got {ongoing!r}")


@dataclass(frozen=True)
class IngressOptions:
    """What the ingress serves: ``create_app``'s options, and where the Responses
    API keeps its conversations (``responses_dir``; None: in the ingress's memory)."""

    model_name: str
    app_options: dict[str, Any] = field(default_factory=dict)
    responses_dir: str | None = None


@serve.ingress()
class Ingress:
    """The HTTP front: the whole OpenAI-compatible app, over the replica deployment."""

    def __init__(self, replicas: Any, model_folder: str, options: IngressOptions) -> None:
        self.replicas = replicas
        self.model_folder = model_folder
        self.options = options
        self.client: RemoteEngineClient | None = None

    async def __serve_build_asgi_app__(self):
        """Build ``create_app`` over a client of the replicas (once they answer)."""
        from prefixcache.client import ResponseStore
        from server.app import create_app

        self.client = await RemoteEngineClient.connect(self.replicas, self.model_folder)
        folder = self.options.responses_dir
        store = ResponseStore(folder=folder) if folder is not None else None
        return create_app(
            self.client,
            model_name=self.options.model_name,
            response_store=store,
            **self.options.app_options,
        )

    def routing_info(self) -> dict[str, Any] | None:
        """The replica router's view from this ingress (tests and operators read it)."""
        return self.client.routing_info() if self.client is not None else None

    def __del__(self) -> None:
        if self.client is not None:
            self.client.shutdown()


def build_app(
    engine_options: dict[str, Any],
    *,
    model_name: str,
    cluster: ClusterOptions | None = None,
    app_options: dict[str, Any] | None = None,
    responses_dir: str | None = None,
):
    """The Serve application: ``Ingress`` over ``cluster.num_replicas`` engines.

    ``engine_options`` are ``Engine.from_pretrained``'s arguments, ``model`` included
    (a folder or hub id every node can read). ``app_options`` go to
    ``server.app.create_app``. Deploy it with ``serve.run(app, route_prefix="/")``.
    """
    cluster = cluster or ClusterOptions()
    if not engine_options.get("model"):
        raise ValueError("engine_options must name the model")
    replica = serve.deployment(EngineReplica).options(
        num_replicas=cluster.num_replicas,
        ray_actor_options={"num_cpus": cluster.replica_cpus},
        max_ongoing_requests=cluster.max_ongoing_requests
        or engine_options.get("max_num_seqs", 128),
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        request_router_config=_router_config(cluster),
    )
    ingress = serve.deployment(Ingress).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000
    )
    options = IngressOptions(model_name, dict(app_options or {}), responses_dir)
    return ingress.bind(replica.bind(engine_options), _model_folder(engine_options), options)


def _router_config(cluster: ClusterOptions) -> RequestRouterConfig:
    if cluster.router == "default":
        return RequestRouterConfig(request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)
    return RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"imbalance_threshold": cluster.imbalance_threshold},
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
    )


def _model_folder(engine_options: dict[str, Any]) -> str:
    """The model's local folder (downloaded once here when it is a hub id)."""
    from prefixcache.models.loader import resolve_model_path

    return str(resolve_model_path(engine_options["model"]))
