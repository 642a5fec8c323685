"""Prometheus metrics of one app instance (GET /metrics/prometheus).

Each app gets its own ``CollectorRegistry``, so several apps in one process (tests, the
benchmark) do not clash over metric names. Request metrics are recorded by a pure ASGI
middleware labelled with the route template (``/score/batch``, ``/report/plots/{path}``,
not the raw path), so an attacker probing random URLs cannot blow up the label
cardinality: only a path no route serves counts as ``unmatched``.

No ``*_created`` series: they double the series count and no dashboard reads them
(``disable_created_metrics`` is process-wide, set when this module is imported).

Directions: ``gradunc_p_ood`` grows with unfamiliar inputs, ``gradunc_p_correct`` with
trust in the prediction; ``gradunc_answers_total{is_ood="true"}`` counts the answers
at or above the bundle's threshold (``gradunc_ood_threshold``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "LiveMetrics", "MetricsMiddleware", "ServiceMetrics"]

disable_created_metrics()

#: p_ood buckets before a bundle is loaded; at load the bundle's threshold and points
#: 0.01, 0.02 and 0.05 either side of it are added (see :func:`p_ood_buckets`).
_P_OOD_BASE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_THRESHOLD_OFFSETS = (-0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05)
#: p_correct buckets: fine near 1, where "accept the prediction" thresholds sit.
_P_CORRECT_BUCKETS = (
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.85,
    0.9,
    0.95,
    0.98,
    0.99,
    0.995,
    0.999,
    1.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def p_ood_buckets(threshold: float | None) -> tuple[float, ...]:
    """Histogram bounds for p_ood that resolve the region around ``threshold``."""
    bounds = set(_P_OOD_BASE_BUCKETS)
    if threshold is not None and 0.0 <= threshold <= 1.0:
        bounds |= {
            round(threshold + offset, 6)
            for offset in _THRESHOLD_OFFSETS
            if 0.0 < threshold + offset < 1.0
        }
    return tuple(sorted(bounds))


def route_template(scope: Scope) -> str:
    """The template of the plain route or mount that will answer ``scope``.

    FastAPI records the route it ran (``scope["route"]``) only for its API routes, so
    /docs, /openapi.json and mounted static files would look unmatched. This matches the
    app's top-level routes that have a path, the way Starlette's router does (first full
    match, else the first partial one: a wrong method), before the router runs and
    rewrites the scope. Mounts count under ``<prefix>/{path}``. Included routers have no
    path of their own; their API routes are named by ``scope["route"]`` afterwards.
    """
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", ())
    partial = None
    for route in routes:
        if getattr(route, "path", None) is None:
            continue
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return _template(route)
        if match is Match.PARTIAL and partial is None:
            partial = route
    return _template(partial) if partial is not None else "unmatched"


def _template(route: Any) -> str:
    path = getattr(route, "path", None) or "unmatched"
    return f"{path}/{{path}}" if isinstance(route, Mount) else path


class ServiceMetrics:
    """The service's collectors, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "gradunc_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gradunc_http_request_duration_seconds",
            "Time from request start to the end of the response body, by route and status.",
            ["endpoint", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "gradunc_batch_size_images",
            "Images per engine call formed by the dynamic batcher.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.engine_seconds = Histogram(
            "gradunc_engine_batch_seconds",
            "Time of one engine call (scoring one batch) in the worker thread.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gradunc_queue_depth_images",
            "Images admitted and not yet scored (decoding, waiting, or in the engine).",
            registry=self.registry,
        )
        self.rejected = Counter(
            "gradunc_queue_rejections_total",
            "Requests answered 503 because the batcher's queue was full.",
            registry=self.registry,
        )
        self.images_scored = Counter(
            "gradunc_images_scored_total",
            "Images scored and returned to clients.",
            registry=self.registry,
        )
        self.p_ood = self._p_ood_histogram(None)
        self.p_correct = Histogram(
            "gradunc_p_correct",
            "p_correct of the images served (higher: prediction more likely right).",
            buckets=_P_CORRECT_BUCKETS,
            registry=self.registry,
        )
        self.answers = Counter(
            "gradunc_answers",
            "Score objects returned, by is_ood (p_ood at or above the bundle's threshold).",
            ["is_ood"],
            registry=self.registry,
        )
        for value in ("true", "false"):
            self.answers.labels(value)  # both series exist from the start, at 0
        self.model = Info(
            "gradunc_model",
            "The loaded bundle: its model_version (empty until a bundle has loaded).",
            registry=self.registry,
        )
        self.ood_threshold = Gauge(
            "gradunc_ood_threshold",
            "The loaded bundle's is_ood threshold on p_ood (NaN until a bundle has loaded).",
            registry=self.registry,
        )
        self.ood_threshold.set(float("nan"))
        self.ready = Gauge(
            "gradunc_model_ready",
            "1 when the bundle is loaded and warm, else 0.",
            registry=self.registry,
        )
        self.live = LiveMetrics(self.registry)

    def _p_ood_histogram(self, threshold: float | None) -> Histogram:
        return Histogram(
            "gradunc_p_ood",
            "p_ood of the images served (higher: more likely out of distribution).",
            buckets=p_ood_buckets(threshold),
            registry=self.registry,
        )

    def model_loaded(self, model_version: str, ood_threshold: float | None) -> None:
        """Record the loaded bundle; p_ood's buckets are rebuilt around its threshold.

        Called once, when the bundle is ready and before any image is scored, so the
        rebuilt histogram loses no observation.
        """
        self.model.info({"model_version": model_version})
        if ood_threshold is not None:
            self.ood_threshold.set(ood_threshold)
        self.registry.unregister(self.p_ood)
        self.p_ood = self._p_ood_histogram(ood_threshold)

    def observe_results(self, results: Iterable[dict[str, Any]]) -> None:
        count = 0
        for result in results:
            self.p_ood.observe(result["p_ood"])
            self.p_correct.observe(result["p_correct"])
            self.answers.labels("true" if result["is_ood"] else "false").inc()
            count += 1
        self.images_scored.inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        plain_route = route_template(scope)  # before the router rewrites the scope (mounts)
        status = 500  # what the client sees if the app dies before starting a response

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            api_route = getattr(scope.get("route"), "path", None)
            endpoint = api_route if isinstance(api_route, str) else plain_route
            labels = (endpoint, scope.get("method", ""), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)


class LiveMetrics:
    """The live store's health and GET /metrics/live's figures, as Prometheus series.

    The figures are recomputed every GRADUNC_LIVE_REFRESH_S and on every GET
    /metrics/live; an undefined one (a class missing, no drift reference) is NaN. Scores
    are confidences (larger: more likely correct and in distribution); the comparisons
    and measures are those of ``app.store.quality``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.store_up = Gauge(
            "gradunc_store_up",
            "1 when the live store takes writes; 0 while it is starting, degraded or off.",
            registry=registry,
        )
        self.store_pending = Gauge(
            "gradunc_store_pending_records",
            "Served records buffered in memory and not yet written to the live store.",
            registry=registry,
        )
        self.store_written = Counter(
            "gradunc_store_records_written",
            "Served records written to the live store.",
            registry=registry,
        )
        self.store_dropped = Counter(
            "gradunc_store_records_dropped",
            "Served records never written (buffer full while the store was unreachable).",
            registry=registry,
        )
        self.store_failures = Counter(
            "gradunc_store_write_failures",
            "Attempts to reach the live store that failed (each one is retried).",
            registry=registry,
        )
        self.feedback_items = Counter(
            "gradunc_feedback_items",
            "Feedback items committed, by outcome (matched a served request id, or unknown).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("matched", "unknown"):
            self.feedback_items.labels(outcome)
        self.images = Gauge(
            "gradunc_live_images",
            "Images in the live window: scored, labelled, labelled_in_distribution, "
            "labelled_ood, correct.",
            ["kind"],
            registry=registry,
        )
        self.accuracy = Gauge(
            "gradunc_live_accuracy",
            "Accuracy on labelled in-distribution images in the live window (NaN: none).",
            registry=registry,
        )
        self.quality = Gauge(
            "gradunc_live_quality",
            "AUROC, AUPR-In, AUPR-Out, FPR at 95% TPR of a score on labelled live traffic.",
            ["comparison", "score", "measure"],
            registry=registry,
        )
        self.quality_images = Gauge(
            "gradunc_live_quality_images",
            "Labelled images a live quality figure is computed from.",
            ["comparison", "score"],
            registry=registry,
        )
        self.drift = Gauge(
            "gradunc_live_drift",
            "Drift of a served score against the calibration split: psi, ks (statistic).",
            ["score", "statistic"],
            registry=registry,
        )
        self.window = Gauge(
            "gradunc_live_window_seconds",
            "Length of the window the live figures cover.",
            registry=registry,
        )
        self.updated = Gauge(
            "gradunc_live_updated_timestamp_seconds",
            "Unix time the live figures were last computed.",
            registry=registry,
        )

    def observe(self, report: dict[str, Any], computed_at: float) -> None:
        """Set every live gauge from one GET /metrics/live report."""

        def value(number: float | None) -> float:
            return float("nan") if number is None else float(number)

        for kind, count in report["counts"].items():
            self.images.labels(kind).set(count)
        self.accuracy.set(value(report["accuracy"]["value"]))
        self.quality.clear()
        self.quality_images.clear()
        for record in report["quality"]:
            labels = (record["comparison"], record["score"])
            self.quality_images.labels(*labels).set(record["count"])
            for measure in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
                self.quality.labels(*labels, measure).set(value(record[measure]))
        for record in report["drift"]:
            self.drift.labels(record["score"], "psi").set(value(record["psi"]))
            self.drift.labels(record["score"], "ks").set(value(record["ks_statistic"]))
        self.window.set(report["window_s"])
        self.updated.set(computed_at)
