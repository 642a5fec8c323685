"""OpenAPI fragments shared by the routers: the problem+json error responses."""

from __future__ import annotations

from typing import Any

from app.errors import PROBLEM_JSON
from app.schemas import Problem

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
    """``responses=`` entries documenting problem+json answers with these status codes."""
    return {
        code: {
            "model": Problem,
            "description": _WHEN[code],
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in status_codes
    }
