"""The client's errors::

    ScoringError                 the service answered with an error (problem+json)
    └── ServiceUnavailableError  503 after every retry, or 503 without Retry-After
                                 (the bundle failed to load: retrying will not help)

Network failures are httpx's own exceptions (``httpx.ConnectError`` and friends).
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["ScoringError", "ServiceUnavailableError", "error_from_response"]


class ScoringError(Exception):
    """An error answer: ``status``, the problem's ``title`` and ``detail``, the whole body."""

    def __init__(self, status: int, title: str, detail: str, problem: dict[str, Any]) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.problem = problem

    @property
    def type(self) -> str:
        """The problem type, e.g. ``urn:gradient-uncertainty:problem:queue-full``."""
        return str(self.problem.get("type", "about:blank"))


class ServiceUnavailableError(ScoringError):
    """503: still loading or queue full after every retry, or a bundle that failed."""


def error_from_response(response: httpx.Response) -> ScoringError:
    """The error an error response stands for (problem+json, or whatever a proxy sent)."""
    problem: dict[str, Any]
    try:
        body = response.json()
        problem = body if isinstance(body, dict) else {"detail": str(body)}
    except ValueError:
        problem = {"detail": response.text[:500] or "(empty body)"}
    status = response.status_code
    title = str(problem.get("title") or response.reason_phrase or "Error")
    detail = str(problem.get("detail") or "")
    kind = ServiceUnavailableError if status == 503 else ScoringError
    return kind(status, title, detail, problem)
