"""A request cut off by the shutdown gets a 503 problem, not uvicorn's bare 500.

After SIGTERM uvicorn waits ``timeout_graceful_shutdown`` for the requests in flight and
then cancels their tasks. A cancelled request that had not started its response would
get uvicorn's plain-text ``500 Internal Server Error`` and a traceback in the log, as if
the service had failed; it did not, it was stopped. This middleware answers such a
request ``503`` with ``Retry-After`` (another replica, or this one restarted, can score
it) and ends the task normally, so the shutdown goes on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.errors import NotReady, error_response

__all__ = ["ShutdownCancellationMiddleware"]

logger = logging.getLogger(__name__)


class ShutdownCancellationMiddleware:
    """Pure ASGI middleware: a cancelled HTTP request that sent nothing yet gets a 503."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if started:
                raise
            logger.warning(
                "%s %s cut off by the shutdown: answered 503", scope["method"], scope["path"]
            )
            error = NotReady("the server shut down before this request was answered; retry it")
            await error_response(error, instance=scope["path"])(scope, receive, send)
