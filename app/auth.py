"""The API key: one check, a throttle on wrong keys, and protecting every endpoint.

:func:`check_api_key` is the only place a key is compared (in constant time). It never
puts anything of the ``Authorization`` header into an answer: a key sent in the wrong
place (``Authorization: <key> Bearer``, a bare key) must not come back in an error.

:class:`AuthThrottle` counts wrong keys per client address in fixed windows of
``GRADUNC_AUTH_FAILURE_WINDOW_S``; after ``GRADUNC_AUTH_MAX_FAILURES`` the client gets 429
with Retry-After until the window ends, even with the right key (otherwise guessing would
simply go on). It remembers at most ``MAX_TRACKED_CLIENTS`` addresses, the least recently
seen forgotten first, so a flood of addresses cannot grow it. The address is the socket
peer unless ``GRADUNC_FORWARDED_ALLOW_IPS`` names a trusted proxy.

The scoring routes require the key through a dependency (so the OpenAPI schema shows
it); with ``GRADUNC_PROTECT_ALL_ENDPOINTS`` :class:`ApiKeyMiddleware` requires it on every
other path too, /healthz and /readyz excepted (orchestrators probe them without a key).
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.errors import PROBLEM_JSON, ServiceError, TooManyRequests, Unauthorized, problem_body

__all__ = [
    "MAX_TRACKED_CLIENTS",
    "OPEN_PATHS",
    "REALM",
    "ApiKeyMiddleware",
    "AuthThrottle",
    "check_api_key",
]

#: The realm named in WWW-Authenticate challenges.
REALM = "gradient-uncertainty"
#: Paths that never require the key: liveness and readiness probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: Most client addresses the throttle remembers.
MAX_TRACKED_CLIENTS = 4096
#: Authorization schemes other than Bearer that clients commonly send; only these are
#: named back in an error, as anything else may be the key itself.
_KNOWN_SCHEMES = frozenset({"basic", "digest", "negotiate", "ntlm", "token", "apikey", "dpop"})


@dataclass
class _Window:
    started: float
    failures: int


class AuthThrottle:
    """Wrong-key counts per client address, in fixed windows, for a bounded set of clients."""

    def __init__(self, *, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def _window(self, client: str, now: float) -> _Window | None:
        window = self._windows.get(client)
        if window is not None and now - window.started >= self.window_s:
            del self._windows[client]
            return None
        return window

    def refuse_if_throttled(self, client: str) -> None:
        """Raise 429 while ``client`` has used up its wrong keys for this window."""
        now = time.monotonic()
        window = self._window(client, now)
        if window is not None and window.failures >= self.max_failures:
            retry_after_s = max(1, math.ceil(window.started + self.window_s - now))
            raise TooManyRequests(
                f"too many wrong API keys from this client ({window.failures} within "
                f"{self.window_s:g} s, the limit of GRADUNC_AUTH_MAX_FAILURES="
                f"{self.max_failures}); retry in {retry_after_s} s",
                retry_after_s=retry_after_s,
            )

    def record_failure(self, client: str) -> None:
        now = time.monotonic()
        window = self._window(client, now)
        if window is None:
            window = self._windows[client] = _Window(now, 0)
        window.failures += 1
        self._windows.move_to_end(client)
        while len(self._windows) > MAX_TRACKED_CLIENTS:
            self._windows.popitem(last=False)


def _challenge(error: str | None = None) -> dict[str, str]:
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}", error_description="the API key is not valid"'
    return {"WWW-Authenticate": value}


def check_api_key(
    settings: Settings, throttle: AuthThrottle, client: str, authorization: str | None
) -> None:
    """Accept the request or raise 401 / 429; nothing of ``authorization`` is echoed."""
    if settings.api_key is None:
        return
    throttle.refuse_if_throttled(client)
    header = (authorization or "").strip()
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if not header or (scheme.lower() == "bearer" and not token):
        raise Unauthorized(
            "this endpoint requires an API key: send the header 'Authorization: Bearer <key>'",
            headers=_challenge(),
        )
    if scheme.lower() != "bearer":
        if not token:
            detail = "the Authorization header has no scheme; send 'Bearer <key>'"
        elif scheme.lower() in _KNOWN_SCHEMES:
            detail = f"the Authorization header uses the scheme {scheme!r}; send 'Bearer <key>'"
        else:
            detail = "the Authorization header does not use the Bearer scheme; send 'Bearer <key>'"
        raise Unauthorized(detail, headers=_challenge())
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(token.encode("utf-8", "surrogateescape"), expected):
        throttle.record_failure(client)
        raise Unauthorized(
            "the API key in the Authorization header is not valid",
            headers=_challenge("invalid_token"),
        )


class ApiKeyMiddleware:
    """With ``protect_all_endpoints``, the key on every path but :data:`OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, *, settings: Settings, throttle: AuthThrottle) -> None:
        self.app = app
        self.settings = settings
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.settings.api_key is None
            or not self.settings.protect_all_endpoints
            or scope.get("path") in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
        client = (scope.get("client") or ("unknown", 0))[0]
        try:
            check_api_key(self.settings, self.throttle, client, authorization)
        except ServiceError as error:
            body = problem_body(error, instance=scope.get("path"))
            headers = [
                (name.lower().encode(), value.encode()) for name, value in error.headers.items()
            ]
            await send(
                {
                    "type": "http.response.start",
                    "status": error.status_code,
                    "headers": [
                        (b"content-type", PROBLEM_JSON.encode()),
                        (b"content-length", str(len(body)).encode()),
                        *headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["api_key_checked"] = True
        await self.app(scope, receive, send)
