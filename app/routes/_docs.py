"""What /docs shows: problem+json error responses with real examples, operation ids,
Swagger UI served from the ``fastapi-offline`` package (no CDN), and ``/`` -> ``/docs``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute

from app.errors import PROBLEM_JSON
from app.openapi_examples import problem_examples
from app.schemas import Problem

__all__ = ["DOCS_ASSETS_URL", "docs_options", "operation_id", "problem_responses", "router"]

#: Where Swagger UI's JavaScript and CSS are served (the package's own copies).
DOCS_ASSETS_URL = "/docs/assets"

_WHEN = {
    400: "Malformed request (e.g. broken multipart body).",
    401: "Missing or wrong API key (only when GRADUNC_API_KEY is set).",
    404: "No such resource.",
    413: "Over a limit: body bytes, image pixels or images per batch; `limit` names it.",
    415: "Unsupported Content-Type.",
    422: "Missing or wrongly named part, empty or undecodable image, bad query parameter.",
    503: "Bundle still loading (Retry-After), failed to load, or queue full (Retry-After).",
}


def problem_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting problem+json answers with these status codes.

    Only ``application/problem+json`` is listed (no ``model=``, which would add an
    ``application/json`` entry the service never sends), with the schema inline and the
    real answers of :mod:`app.openapi_examples` as examples.
    """
    schema = Problem.model_json_schema()
    responses: dict[int | str, dict[str, Any]] = {}
    for code in status_codes:
        media: dict[str, Any] = {"schema": schema}
        examples = problem_examples(code)
        if examples:
            media["examples"] = examples
        responses[code] = {"description": _WHEN[code], "content": {PROBLEM_JSON: media}}
    return responses


def operation_id(route: APIRoute) -> str:
    """The route function's name (``score_image``), not FastAPI's ``score_image_score_post``."""
    return route.name


def docs_options() -> dict[str, Any]:
    """Keyword arguments of ``fastapi_offline.FastAPIOffline`` for the app."""
    return {
        "static_url": DOCS_ASSETS_URL,
        "generate_unique_id_function": operation_id,
        "swagger_ui_parameters": {
            "displayOperationId": True,
            "tryItOutEnabled": True,
            "validatorUrl": None,  # no badge fetched from the validator's site
        },
    }


router = APIRouter(include_in_schema=False)


@router.get("/")
async def root(request: Request) -> RedirectResponse:
    """The API's front page is its documentation."""
    return RedirectResponse(f"{request.scope.get('root_path', '')}/docs", status_code=307)
