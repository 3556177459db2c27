"""How failures that cross Ray reach a client: the engine's own errors, and a lost
replica as a 503 to retry (no Ray instance is started)."""

from __future__ import annotations

import pytest

exceptions = pytest.importorskip("ray.exceptions")

from prefixcache.client import EngineDeadError, ReplicaLostError  # noqa: E402
from prefixcache.cluster.remote_client import _translated  # noqa: E402
from server.errors import engine_error  # noqa: E402


def test_a_dead_or_unavailable_replica_is_a_lost_replica():
    for exc in (exceptions.ActorDiedError(), exceptions.ActorUnavailableError("gone", None)):
        translated = _translated(exc)
        assert isinstance(translated, ReplicaLostError)
        assert "was lost" in str(translated) and "retry" in str(translated)


def test_a_replicas_stopped_engine_is_a_lost_replica_not_a_dead_front():
    assert isinstance(_translated(EngineDeadError("stopped")), ReplicaLostError)


def test_an_error_raised_on_the_replica_arrives_as_itself():
    cause = ValueError("prompt too long")
    wrapped = exceptions.RayTaskError("generate", "traceback", cause)
    assert _translated(wrapped) is cause


def test_a_lost_replica_is_a_503_with_retry_after():
    error = engine_error(ReplicaLostError("replica r1", "ActorDiedError"))
    assert error.status == 503 and error.code == "replica_lost"
    assert error.headers == {"Retry-After": "1"}
    assert "replica r1" in error.message
