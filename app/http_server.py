"""The HTTP server's own limits: uvicorn's options and a guarded HTTP/1.1 protocol.

What the ASGI app cannot see is limited here, at the connection, before a request exists:

- **time to send the headers**: a connection that sends nothing, or a request line and
  headers that do not complete within ``GRADUNC_HEADER_TIMEOUT_S`` (from the connection's
  start, or from the end of its previous response) is answered 408 (closed silently when
  nothing at all arrived);
- **header size**: h11 buffers at most ``GRADUNC_MAX_HEADER_BYTES`` of an incomplete
  request head; beyond that the answer is 431 (uvicorn's own answer would be a plain 400,
  and its default parser, httptools, has no such limit at all);
- **idle keep-alive**: ``GRADUNC_KEEP_ALIVE_TIMEOUT_S``;
- **proxies**: ``X-Forwarded-For`` / ``-Proto`` are believed only from
  ``GRADUNC_FORWARDED_ALLOW_IPS`` (none by default), so a client cannot forge its address.

The body deadline, the header count and the body size are checked by the app's
middleware (``app.uploads.RequestLimitsMiddleware``), so they work under any server.
Every answer given here is problem+json like the app's, and a malformed request is a 400,
never a 500. h11 also handles pipelined requests one at a time, so a valid request
followed by garbage in the same packet gets its own answer before the 400.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.config import Settings
from app.errors import PROBLEM_JSON

__all__ = ["GRACEFUL_SHUTDOWN_S", "GuardedH11Protocol", "uvicorn_options"]

#: Longest uvicorn waits for requests in flight after SIGTERM before cancelling them; a
#: container's stop grace period should be a little longer. A slow upload does not hold
#: the shutdown this long: its body deadline ends it first.
GRACEFUL_SHUTDOWN_S = 30

_PROBLEM_PREFIX = "urn:gradient-uncertainty:problem:"


def _problem(status: int, title: str, problem: str, detail: str) -> bytes:
    body = {"type": _PROBLEM_PREFIX + problem, "title": title, "status": status, "detail": detail}
    return json.dumps(body).encode()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head and a 431 for its size."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    # -- the deadline for the request line and headers ---------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or broken)
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still on its way; its completion re-arms the timer
        received, _ = self.conn.trailing_data
        if received:  # part of a request arrived: say why it is cut off
            body = _problem(
                408,
                "Request Timeout",
                "request-timeout",
                "the request line and headers did not arrive within "
                f"{self.header_timeout_s:g} s (GRADUNC_HEADER_TIMEOUT_S)",
            )
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\n"
                + f"content-type: {PROBLEM_JSON}\r\ncontent-length: {len(body)}\r\n".encode()
                + b"connection: close\r\n\r\n"
                + body
            )
        self.transport.close()

    # -- a malformed or oversized request head ------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """Answer a request h11 refused: 431 when its head is too long, else 400."""
        self._cancel_header_timer()
        limit = self.conn._max_incomplete_event_size  # h11 keeps no public accessor
        received, _ = self.conn.trailing_data
        if len(received) > limit:
            status, title, problem = 431, "Request Header Fields Too Large", "headers-too-large"
            detail = (
                f"the request line and headers are longer than {limit} bytes, the limit "
                "(GRADUNC_MAX_HEADER_BYTES)"
            )
        else:
            status, title, problem = 400, "Bad Request", "bad-request"
            detail = "malformed HTTP/1.1 request: the request line or a header is not valid"
        body = _problem(status, title, problem, detail)
        headers = [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            output = self.conn.send(h11.Response(status_code=status, headers=headers, reason=title))
            output += self.conn.send(h11.Data(data=body)) or b""
            output += self.conn.send(h11.EndOfMessage()) or b""
            self.transport.write(output)
        except h11.LocalProtocolError:
            pass  # h11 cannot answer in this state; closing says enough
        self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` for these settings.

    The h11 parser (not httptools) because it limits the size of the request head, and
    the guarded protocol because uvicorn sets no deadline on receiving it.
    """
    return {
        "http": functools.partial(GuardedH11Protocol, header_timeout_s=settings.header_timeout_s),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": ",".join(settings.forwarded_allow_ips) or "",
        "server_header": False,
    }
