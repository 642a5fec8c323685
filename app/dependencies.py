"""Dependencies as type aliases, so a route's signature says what it needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import AuthThrottle, check_api_key
from app.config import Settings
from app.metrics import ServiceMetrics
from app.service import Scorer, ScoringService

__all__ = [
    "MetricsDep",
    "ReadyScorerDep",
    "ServiceDep",
    "SettingsDep",
    "require_api_key",
]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_service(request: Request) -> ScoringService:
    return request.app.state.service


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[ScoringService, Depends(get_service)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


async def get_ready_scorer(service: ServiceDep) -> Scorer:
    """The loaded scorer; 503 (problem+json, Retry-After while loading) until then."""
    return service.require_ready()


ReadyScorerDep = Annotated[Scorer, Depends(get_ready_scorer)]

_bearer = HTTPBearer(
    auto_error=False,
    description="The API key (GRADUNC_API_KEY), when the service is configured with one.",
)


async def get_auth_throttle(request: Request) -> AuthThrottle:
    return request.app.state.auth_throttle


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    throttle: Annotated[AuthThrottle, Depends(get_auth_throttle)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Check ``Authorization: Bearer <key>`` when an API key is configured.

    ``credentials`` is unused: ``app.auth.check_api_key`` reads the raw header (so that it
    can tell a missing scheme from a wrong one); the dependency puts the scheme into the
    OpenAPI schema.
    """
    del credentials
    if getattr(request.state, "api_key_checked", False):
        return  # ApiKeyMiddleware checked it already (GRADUNC_PROTECT_ALL_ENDPOINTS)
    client = request.client.host if request.client is not None else "unknown"
    check_api_key(settings, throttle, client, request.headers.get("authorization"))
