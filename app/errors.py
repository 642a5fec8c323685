"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error the service answers is one of these, turned into a response by one handler::

    ServiceError (500)                     something failed on our side
    ├── BadRequest (400)                   malformed request (multipart syntax, empty body)
    ├── Unauthorized (401)                 missing or wrong API key; WWW-Authenticate
    ├── RequestTimeout (408)               the body did not arrive in time
    ├── PayloadTooLarge (413)              body, pixels, frames, decode cost over a limit
    ├── UnsupportedMediaType (415)         neither multipart nor an image/* body
    ├── UnprocessableContent (422)         wrong or missing parts, undecodable image
    ├── TooManyRequests (429)              too many wrong API keys; Retry-After
    ├── HeadersTooLarge (431)              too many request headers
    ├── ClientClosedRequest (499)          the client went away mid-request (nginx's code)
    └── ServiceUnavailable (503)           Retry-After
        ├── NotReady                       bundle still loading or failed to load
        └── QueueFull                      the batcher's bounded queue is full

Request-validation errors (bad query parameters), Starlette's HTTP errors (404, 405) and
unexpected exceptions are mapped to the same format by :func:`install_error_handlers`;
an unexpected exception is logged with its traceback and answered 500 without details.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "PROBLEM_JSON",
    "BadRequest",
    "ClientClosedRequest",
    "HeadersTooLarge",
    "RequestTimeout",
    "TooManyRequests",
    "NotReady",
    "PayloadTooLarge",
    "QueueFull",
    "ServiceError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnprocessableContent",
    "UnsupportedMediaType",
    "error_response",
    "install_error_handlers",
    "problem_body",
    "problem_response",
]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

#: Problem types are URNs: stable identifiers clients can switch on, with no page to host.
_TYPE_PREFIX = "urn:gradient-uncertainty:problem:"


class ServiceError(Exception):
    """Base of the service's errors: a status code, a problem type and a detail message.

    ``extra`` becomes extension members of the problem object (e.g. the limit that was
    exceeded); ``headers`` are added to the response.
    """

    status_code: int = 500
    problem: str = "internal-error"

    def __init__(
        self,
        detail: str,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    @property
    def type_uri(self) -> str:
        return _TYPE_PREFIX + self.problem


class BadRequest(ServiceError):
    status_code = 400
    problem = "bad-request"


class Unauthorized(ServiceError):
    status_code = 401
    problem = "unauthorized"


class _OverLimit(ServiceError):
    """An error that names the setting whose limit was passed, and its value."""

    def __init__(self, detail: str, *, limit: str, limit_value: int | float) -> None:
        super().__init__(detail, extra={"limit": limit, "limit_value": limit_value})


class RequestTimeout(_OverLimit):
    status_code = 408
    problem = "request-timeout"


class PayloadTooLarge(_OverLimit):
    status_code = 413
    problem = "payload-too-large"


class HeadersTooLarge(_OverLimit):
    status_code = 431
    problem = "headers-too-large"


class TooManyRequests(ServiceError):
    status_code = 429
    problem = "too-many-requests"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class ClientClosedRequest(ServiceError):
    """The client closed the connection mid-request; nobody reads the answer."""

    status_code = 499
    problem = "client-closed-request"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    problem = "unsupported-media-type"


class UnprocessableContent(ServiceError):
    status_code = 422
    problem = "unprocessable-content"


class ServiceUnavailable(ServiceError):
    status_code = 503
    problem = "service-unavailable"

    def __init__(
        self, detail: str, *, retry_after_s: int | None = 1, extra: Mapping[str, Any] | None = None
    ) -> None:
        headers = {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}
        super().__init__(detail, extra=extra, headers=headers)


class NotReady(ServiceUnavailable):
    problem = "not-ready"


class QueueFull(ServiceUnavailable):
    problem = "queue-full"


def problem_response(
    status_code: int,
    detail: str,
    *,
    type_uri: str = "about:blank",
    title: str | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    instance: str | None = None,
) -> JSONResponse:
    """An ``application/problem+json`` response (RFC 9457 members plus extensions)."""
    body: dict[str, Any] = {
        "type": type_uri,
        "title": title or _reason(status_code),
        "status": status_code,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extra or {})
    return JSONResponse(body, status_code=status_code, headers=headers, media_type=PROBLEM_JSON)


def error_response(error: ServiceError, *, instance: str | None = None) -> JSONResponse:
    """The problem+json response of ``error``: its status, type, detail, extension
    members and headers (``instance``: the request path)."""
    return problem_response(
        error.status_code,
        error.detail,
        type_uri=error.type_uri,
        extra=error.extra,
        headers=error.headers,
        instance=instance,
    )


def problem_body(error: ServiceError, *, instance: str | None = None) -> bytes:
    """The problem+json body of ``error`` as bytes (for answers given outside a route)."""
    return bytes(error_response(error, instance=instance).body)


def _reason(status_code: int) -> str:
    if status_code == 499:
        return "Client Closed Request"
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


def _describe_validation_error(error: Mapping[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ())]
    if len(location) >= 2 and location[0] in ("query", "path", "header", "cookie"):
        where = f"{location[0]} parameter {'.'.join(location[1:])!r}"
    else:
        where = ".".join(location) or "request"
    message = error.get("msg", "invalid")
    received = error.get("input")
    suffix = f", got {received!r}" if isinstance(received, str | int | float) else ""
    return f"{where}: {message}{suffix}"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status_code >= 500 and not isinstance(exc, ServiceUnavailable):
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
    return error_response(exc, instance=request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    detail = "; ".join(_describe_validation_error(error) for error in errors) or "invalid request"
    return problem_response(
        422,
        detail,
        type_uri=_TYPE_PREFIX + "validation-error",
        extra={
            "errors": [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                for e in errors
            ]
        },
        instance=request.url.path,
    )


#: FastAPI's detail when a JSON body is not even text (e.g. not UTF-8); a JSON syntax
#: error is a 422 of its own.
_FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _reason(exc.status_code)
    if exc.status_code == 400 and detail == _FASTAPI_BODY_PARSE_ERROR:
        detail = "the body could not be read: it must be JSON text encoded as UTF-8"
    elif exc.status_code == 404 and detail == "Not Found":
        detail = f"no resource at {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"method {request.method} is not allowed on {request.url.path}" + (
            f"; allowed: {allowed}" if allowed else ""
        )
    return problem_response(exc.status_code, detail, headers=exc.headers, instance=request.url.path)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error in %s %s", request.method, request.url.path)
    return problem_response(
        500,
        f"internal error while handling {request.method} {request.url.path} "
        f"({type(exc).__name__}); the server log has the details",
        type_uri=_TYPE_PREFIX + "internal-error",
        instance=request.url.path,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem+json."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
