"""The app factory and the ``gradient-uncertainty-serve`` entry point.

``create_app`` only builds the app: settings, the data plane, error handlers, middleware
and the routers. The bundle is loaded in the lifespan, in the background, so /healthz
answers while it loads. Run one process per machine (the dynamic batcher is per process;
onnxruntime already uses every core).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.auth import ApiKeyMiddleware, AuthThrottle
from app.config import Settings, get_settings
from app.errors import install_error_handlers
from app.http_server import uvicorn_options
from app.metrics import MetricsMiddleware, ServiceMetrics
from app.routes import _docs, feedback, health, live, reports, scoring
from app.routes.reports import ReportPlots
from app.service import ScorerLoader, ScoringService
from app.shutdown import ShutdownCancellationMiddleware
from app.uploads import RequestLimitsMiddleware

__all__ = ["create_app", "log_config", "run"]

_DESCRIPTION = """\
Scores images of handwritten digits with an ensemble CNN and says how far to trust each
prediction: `p_correct` (is the prediction probably right?) and `p_ood` (is the input
something the model never learned?), from the softmax and from per-sample gradient
metrics fed to meta classifiers. Errors are `application/problem+json` (RFC 9457).
"""


def create_app(
    settings: Settings | None = None,
    *,
    scorer_loader: ScorerLoader | None = None,
    settle_before_serving: bool = False,
) -> FastAPI:
    """A new app; ``scorer_loader`` replaces loading the bundle (tests inject stand-ins).

    ``settle_before_serving``: the lifespan's start-up waits until the bundle has loaded
    (or failed), for hosts that route traffic to an app once its start-up is done (Ray
    Serve replicas); by default it loads in the background and /healthz answers at once.
    """
    settings = settings or get_settings()
    metrics = ServiceMetrics()
    service = ScoringService(settings, metrics, scorer_loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        if settle_before_serving:
            await service.wait_until_settled()
        try:
            yield
        finally:
            await service.stop()

    # FastAPIOffline: FastAPI whose /docs loads Swagger UI from the package, not a CDN.
    app: FastAPI = FastAPIOffline(
        title="Gradient uncertainty scoring service",
        version="0.1.0",
        description=_DESCRIPTION,
        lifespan=lifespan,
        # No redirect from /score/ to /score: its Location would be built from the
        # client's own Host header.
        redirect_slashes=False,
        **_docs.docs_options(),
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.auth_throttle = throttle = AuthThrottle(
        max_failures=settings.auth_max_failures, window_s=settings.auth_failure_window_s
    )

    install_error_handlers(app)
    app.include_router(_docs.router)  # / -> /docs
    app.include_router(health.router)
    app.include_router(scoring.router)
    app.include_router(reports.router)
    app.include_router(live.router)  # its lifespan starts the live store (app.state.store)
    app.include_router(feedback.router)
    app.mount("/report/plots", ReportPlots(service), name="report-plots")
    # Added last = outermost: the metrics see every response, 413s included.
    app.add_middleware(ApiKeyMiddleware, settings=settings, throttle=throttle)
    app.add_middleware(
        RequestLimitsMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_header_count=settings.max_header_count,
        max_header_bytes=settings.max_header_bytes,
    )
    app.add_middleware(ShutdownCancellationMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration plus the service's own loggers (``app``, ``scoring``).

    uvicorn configures only its own loggers; without this the service's lines (bundle
    loaded, bundle refused and why, provider fallback) would reach stderr only through
    Python's last-resort handler, unformatted, and nothing below WARNING at all.
    """
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["service"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
        "use_colors": None,
    }
    config["handlers"]["service"] = {
        "formatter": "service",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    for name in ("app", "scoring"):
        config["loggers"][name] = {
            "handlers": ["service"],
            "level": level.upper() if level != "trace" else "DEBUG",
            "propagate": False,
        }
    return config


def run(argv: Sequence[str] | None = None) -> None:
    """Serve with uvicorn on GRADUNC_HOST:GRADUNC_PORT (console script).

    Flags (``--help``, parsed in ``app.cli``) override the environment. Without a bundle
    at the configured folder it exits at once with status 2 and says which setting to
    set, rather than serving 503 to every request.

    SIGTERM (or Ctrl-C) shuts down gracefully: uvicorn stops accepting connections and
    lets every request in flight finish (for at most http_server.GRACEFUL_SHUTDOWN_S; a slow
    upload only until its body deadline), then the
    lifespan drains the batcher. uvicorn then re-raises the signal, so the exit status
    after SIGTERM is 143 (-15), not 0.
    """
    import uvicorn

    from app.cli import missing_bundle_message, settings_from_args

    settings = settings_from_args(argv)
    problem = missing_bundle_message(settings)
    if problem is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)  # a configuration error, like argparse's own
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        **uvicorn_options(settings),  # timeouts, header limits, trusted proxies
    )


if __name__ == "__main__":
    run()
