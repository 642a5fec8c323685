"""Dependencies as type aliases, so a route's signature says what it needs."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.errors import Unauthorized
from app.metrics import ServiceMetrics
from app.service import Scorer, ScoringService

__all__ = [
    "MetricsDep",
    "ReadyScorerDep",
    "ServiceDep",
    "SettingsDep",
    "require_api_key",
]

#: The realm named in WWW-Authenticate challenges.
REALM = "gradient-uncertainty"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> ScoringService:
    return request.app.state.service


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[ScoringService, Depends(get_service)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


def get_ready_scorer(service: ServiceDep) -> Scorer:
    """The loaded scorer; 503 (problem+json, Retry-After while loading) until then."""
    return service.require_ready()


ReadyScorerDep = Annotated[Scorer, Depends(get_ready_scorer)]

_bearer = HTTPBearer(
    auto_error=False,
    description="The API key (GRADUNC_API_KEY), when the service is configured with one.",
)


def require_api_key(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Check ``Authorization: Bearer <key>`` when an API key is configured."""
    if settings.api_key is None:
        return
    if credentials is None:
        header = request.headers.get("authorization")
        # Name the scheme only when the header has one: a bare key must never be echoed.
        scheme = header.split(" ", 1)[0] if header and " " in header.strip() else None
        if scheme is not None and scheme.lower() != "bearer":
            detail = f"the Authorization header uses the scheme {scheme!r}; send 'Bearer <key>'"
        elif header and header.strip().lower() != "bearer":
            detail = "the Authorization header has no scheme; send 'Bearer <key>'"
        else:
            detail = (
                "this endpoint requires an API key: send the header 'Authorization: Bearer <key>'"
            )
        raise Unauthorized(detail, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise Unauthorized(
            "the API key in the Authorization header is not valid",
            headers={
                "WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token", '
                'error_description="the API key is not valid"'
            },
        )
