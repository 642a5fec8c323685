"""GET /healthz (the process answers) and GET /readyz (bundle loaded, warm, providers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from app.dependencies import ServiceDep
from app.routes._docs import problem_responses
from app.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


class ReadinessResponse(ReadyResponse):
    """Readiness with the execution-provider fallback spelled out."""

    requested_providers: list[str] = Field(
        default_factory=list,
        description="execution providers asked for, best first (GRADUNC_PROVIDERS or the "
        "runtime's default)",
    )
    unavailable_providers: list[str] = Field(
        default_factory=list,
        description="requested providers that no graph got (absent from this onnxruntime "
        "build, or unable to start); the graphs fell back to the next one",
    )
    provider_fallback: str | None = Field(
        default=None,
        description="what the fallback means, in words; null when every graph runs on the "
        "first requested provider",
    )
    store: dict[str, Any] | None = Field(
        default=None,
        description="the live store (POST /feedback, GET /metrics/live): status ok, "
        "starting, degraded (unreachable: scoring goes on, feedback answers 503) or "
        "disabled; backend (sqlite or postgresql), pending and dropped records, error",
    )


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    """200 whenever the process serves HTTP, also while the bundle loads."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    summary="Readiness",
    responses=problem_responses(503),
)
async def readyz(request: Request, service: ServiceDep) -> ReadinessResponse:
    """200 once the bundle is loaded and warm, with the execution provider each scorer
    graph really runs on and which requested providers were unavailable; 503
    problem+json saying why not (still loading, or the load failed and with what
    error)."""
    scorer = service.require_ready()
    providers = dict(scorer.providers_in_use)
    unavailable = list(service.unavailable_providers)
    fallback = None
    if unavailable:
        running_on = ", ".join(sorted(set(providers.values())))
        fallback = (
            f"requested execution provider{'s' if len(unavailable) > 1 else ''} "
            f"{', '.join(unavailable)} unavailable (not in this onnxruntime build, or it "
            f"could not start); the scorer graphs run on {running_on}"
        )
    return ReadinessResponse(
        model_version=scorer.model_version,
        providers=providers,
        bundle_dir=service.bundle_name,  # the folder name: no path in any answer
        max_batch_size=service.settings.max_batch_size,
        requested_providers=list(service.requested_providers),
        unavailable_providers=unavailable,
        provider_fallback=fallback,
        store=store.status() if (store := getattr(request.app.state, "store", None)) else None,
    )
