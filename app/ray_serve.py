"""The service as a Ray Serve application: the same FastAPI app in every replica.

Install the extra and start it with Ray's own command, from the repository root::

    pip install '.[ray]'
    serve run serve_config.yaml      # a local Ray cluster, or --address of a running one

``serve_config.yaml`` sets the replicas (autoscaling bounds), ``max_ongoing_requests``, a
replica's CPUs and GPUs and the service's settings (``GRADUNC_*`` in ``env_vars``).

Each replica is :func:`app.main.create_app`: the same routes, contract, errors, limits and
the project's own dynamic batcher (one batching mechanism per replica; Ray Serve's
``@serve.batch`` is not stacked on it). Ray's proxy replaces uvicorn in front of it, so
what :mod:`app.http_server` adds to uvicorn (header limits, slow-client deadlines) is the
proxy's business here; the body limits and deadlines of the app's own middleware stay.

A replica takes traffic only once its bundle has loaded (its start-up waits for it), and
Ray's health check is the app's state: a replica whose bundle failed to load reports
unhealthy and Ray replaces it. Requests inside a replica that dies are answered 500 by
Ray's proxy (plain text, never the service's problem+json); the project's client
(``gradunc_client``) retries those, as scoring is idempotent. ``/metrics`` is per replica
(each has its own Prometheus registry); Ray exports its own per-replica request metrics
from every node (``ray start --metrics-export-port``).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from app.service import State

__all__ = ["ScoringReplica", "application"]


@serve.deployment
@serve.ingress()
class ScoringReplica:
    """One replica: the FastAPI app, built in the replica's own process."""

    def __serve_build_asgi_app__(self) -> Any:
        # Built here, not at import: the app holds threads, processes and sessions that
        # belong to the replica, and its settings come from the replica's environment.
        from app.main import create_app

        # Ray routes requests to a replica once its start-up is done: so the start-up
        # waits for the bundle, and a new replica never answers "still loading".
        return create_app(settle_before_serving=True)

    async def check_health(self) -> None:
        """Raise (Ray then replaces the replica) once the bundle failed to load."""
        service = self.app.state.service  # type: ignore[attr-defined]
        if service.state is State.FAILED:
            raise RuntimeError(f"the bundle could not be loaded: {service.error}")


#: What ``serve_config.yaml`` imports (``app.ray_serve:application``).
application = ScoringReplica.bind()  # type: ignore[attr-defined]  # added by @serve.deployment
