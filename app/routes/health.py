"""GET /healthz (the process answers) and GET /readyz (bundle loaded, warm, providers)."""

from __future__ import annotations

from fastapi import APIRouter

from app.dependencies import ServiceDep
from app.routes._docs import problem_responses
from app.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    """200 whenever the process serves HTTP, also while the bundle loads."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Readiness",
    responses=problem_responses(503),
)
async def readyz(service: ServiceDep) -> ReadyResponse:
    """200 once the bundle is loaded and warm, with the execution provider each scorer
    graph really runs on; 503 problem+json saying why not (still loading, or the load
    failed and with what error)."""
    scorer = service.require_ready()
    return ReadyResponse(
        model_version=scorer.model_version,
        providers=dict(scorer.providers_in_use),
        bundle_dir=str(service.settings.bundle_dir),
        max_batch_size=service.settings.max_batch_size,
    )
