"""The loaded bundle's evaluation: GET /metrics (JSON), GET /report (HTML and its plots),
and the service's own Prometheus metrics at GET /metrics/prometheus."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from app.dependencies import MetricsDep, ReadyScorerDep
from app.metrics import CONTENT_TYPE_LATEST
from app.routes._docs import problem_responses
from app.schemas import EvaluationReport
from app.service import ScoringService

router = APIRouter(tags=["reports"])


def _json_safe(value: Any) -> Any:
    """NaN and infinities (an undefined AUROC, say) as null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


@router.get(
    "/metrics",
    summary="Evaluation report of the loaded bundle",
    responses={200: {"model": EvaluationReport}, **problem_responses(503)},
)
async def evaluation_metrics(scorer: ReadyScorerDep) -> JSONResponse:
    """`report/evaluation.json` of the bundle: AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR
    of every score on every comparison, mean and std over the ensemble's members."""
    return JSONResponse(_json_safe(scorer.evaluation))


@router.get(
    "/metrics/prometheus",
    summary="Prometheus metrics of this service",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


_HEAD = re.compile(rb"<head(\s[^>]*)?>", re.IGNORECASE)


def _with_base(html: bytes, base_href: str) -> bytes:
    """Make the page's relative links (``plots/x.png``) resolve under /report/."""
    if re.search(rb"<base\s", html, re.IGNORECASE):
        return html
    tag = f'<base href="{base_href}">'.encode()
    match = _HEAD.search(html)
    if match is None:
        return tag + html
    return html[: match.end()] + tag + html[match.end() :]


@router.get(
    "/report",
    summary="HTML evaluation report of the loaded bundle",
    response_class=HTMLResponse,
    responses=problem_responses(404, 503),
)
async def report_page(request: Request, scorer: ReadyScorerDep) -> HTMLResponse:
    """The bundle's `report/index.html`; its plots are served under /report/plots/."""
    page = Path(scorer.report_dir) / "index.html"
    try:
        html = await run_in_threadpool(page.read_bytes)
    except FileNotFoundError:
        raise HTTPException(
            404, "the loaded bundle has no report page (report/index.html is missing)"
        ) from None
    root_path = request.scope.get("root_path", "")
    return HTMLResponse(_with_base(html, f"{root_path}/report/"))


class ReportPlots:
    """Static files from the loaded bundle's ``report/plots`` (mounted at /report/plots).

    The folder is known only once the bundle has loaded, so the StaticFiles app is made
    then; before that the mount answers 503 like every route that needs the bundle.
    """

    def __init__(self, service: ScoringService) -> None:
        self.service = service
        self._files: StaticFiles | None = None
        self._directory: Path | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        directory = Path(self.service.require_ready().report_dir) / "plots"
        if not directory.is_dir():  # removed under a running server: 404, not a 500
            raise HTTPException(
                404, "the loaded bundle has no report plots (report/plots is missing)"
            )
        if self._files is None or self._directory != directory:
            self._files = StaticFiles(directory=directory, check_dir=False)
            self._directory = directory
        await self._files(scope, receive, send)
