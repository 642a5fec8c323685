"""Reading uploaded images from a request: multipart parts or a raw ``image/*`` body.

The multipart body is parsed here with python-multipart's streaming parser rather than
Starlette's form parser: every part arrives as bytes whatever its headers say (a part
without a filename is still an image), parsing stops at the first part beyond the batch
limit, and every error is one of ours with a message saying what was wrong (a client that
goes away mid-upload is a 499 of ours, not a traceback). The body's size limit and its
deadline, and the header count, are enforced underneath by
:class:`RequestLimitsMiddleware` while the bytes stream in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import (
    PROBLEM_JSON,
    BadRequest,
    ClientClosedRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    problem_body,
)

__all__ = [
    "Part",
    "RequestLimitsMiddleware",
    "content_type_of",
    "read_body",
    "read_multipart",
]


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    def label(self, index: int | None = None) -> str:
        """How error messages name this part: ``part 'images' #3 ('scan.png')``."""
        where = f"part {self.name!r}" + (f" #{index}" if index is not None else "")
        return where + (f" ({self.filename!r})" if self.filename else "")


def content_type_of(request: Request) -> tuple[str, dict[bytes, bytes]]:
    """The request's media type (lower case, no parameters) and its parameters."""
    media_type, params = parse_options_header(request.headers.get("content-type"))
    return media_type.decode("latin-1"), params


def _went_away(request: Request) -> ClientClosedRequest:
    return ClientClosedRequest(
        f"the client closed the connection before the whole body of {request.method} "
        f"{request.url.path} arrived"
    )


async def read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:
        raise _went_away(request) from None


async def read_multipart(
    request: Request,
    params: dict[bytes, bytes],
    *,
    max_parts: int,
    too_many_parts: Callable[[], ServiceError],
) -> list[Part]:
    """Every part of the multipart body, in order; at most ``max_parts`` of them."""
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest(
            "Content-Type multipart/form-data has no boundary parameter; "
            "let your HTTP client build the multipart body"
        )
    parts: list[Part] = []
    state: dict[str, object] = {"finished": False}
    headers: dict[bytes, bytes] = {}
    header_name = bytearray()
    header_value = bytearray()
    data = bytearray()

    def on_part_begin() -> None:
        headers.clear()
        data.clear()
        if len(parts) >= max_parts:
            raise too_many_parts()

    def on_header_field(buffer: bytes, start: int, end: int) -> None:
        header_name.extend(buffer[start:end])

    def on_header_value(buffer: bytes, start: int, end: int) -> None:
        header_value.extend(buffer[start:end])

    def on_header_end() -> None:
        headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(buffer: bytes, start: int, end: int) -> None:
        data.extend(buffer[start:end])

    def on_part_end() -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise BadRequest(
                f"multipart part #{len(parts)} has no 'Content-Disposition: form-data; "
                "name=...' header"
            )
        filename = options.get(b"filename")
        content_type = headers.get(b"content-type")
        parts.append(
            Part(
                name=name.decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                content_type=None if content_type is None else content_type.decode("latin-1"),
                data=bytes(data),
            )
        )

    def on_end() -> None:
        state["finished"] = True

    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise BadRequest(
            f"the multipart boundary is {len(boundary)} characters long, more than the "
            f"limit of {MAX_BOUNDARY_LENGTH} (RFC 2046 allows 70); let your HTTP client "
            "build the body"
        )
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as error:
        raise BadRequest(_parse_error_detail(error, parser)) from error
    except ClientDisconnect:
        raise _went_away(request) from None
    if not state["finished"]:
        raise BadRequest(
            "incomplete multipart/form-data body: it ends before the closing boundary "
            f"'--{boundary.decode('latin-1')}--'"
        )
    return parts


def _parse_error_detail(error: FormParserError, parser: MultipartParser) -> str:
    """python-multipart's message, with the limit spelled out where it names one."""
    message = str(error)
    if "header size" in message:
        return (
            "malformed multipart/form-data body: a part header is longer than "
            f"{parser.max_header_size} bytes (a very long filename?)"
        )
    if "header count" in message:
        return (
            "malformed multipart/form-data body: a part has more than "
            f"{parser.max_header_count} headers"
        )
    return f"malformed multipart/form-data body: {message}"


class RequestLimitsMiddleware:
    """Limits of every HTTP request, checked before the app parses anything.

    - **headers**: more than ``max_header_count`` headers, or more than
      ``max_header_bytes`` of them, is answered 431 at once (the server's parser refuses
      a longer head while it is still arriving; one that arrived in a single read is
      caught here);
    - **body size**: a declared Content-Length over ``max_body_bytes`` fails on the first
      read, before any byte is read; a chunked (or under-declared) body fails as soon as
      the bytes received pass the limit (413);
    - **body deadline**: the whole body must arrive within ``body_timeout_s`` of the
      request's start (its headers complete); a read still waiting then fails with 408.
      This also ends a slow upload on SIGTERM, so the shutdown waits at most that long;
    - **a body left unread**: a response that starts before the request body has arrived
      (a 401, a 413, a 408) closes the connection afterwards, so a client cannot keep it
      open by trickling the rest of a body nobody reads.

    The errors are raised from ``receive``, i.e. inside the route that reads the body, so
    they reach the one problem+json handler and are counted under the route's name.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        max_header_count: int,
        max_header_bytes: int,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_header_count = max_header_count
        self.max_header_bytes = max_header_bytes

    def _too_large(self, how: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body {how} the limit of {self.max_body_bytes} bytes (GRADUNC_MAX_BODY_BYTES)",
            limit="GRADUNC_MAX_BODY_BYTES",
            limit_value=self.max_body_bytes,
        )

    def _late(self) -> RequestTimeout:
        return RequestTimeout(
            f"the request body did not arrive within {self.body_timeout_s:g} s "
            "(GRADUNC_BODY_TIMEOUT_S)",
            limit="GRADUNC_BODY_TIMEOUT_S",
            limit_value=self.body_timeout_s,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        if len(headers) > self.max_header_count:
            await self._refuse_headers(
                scope,
                send,
                f"the request has {len(headers)} headers, more than the limit of "
                f"{self.max_header_count} (GRADUNC_MAX_HEADER_COUNT)",
                "GRADUNC_MAX_HEADER_COUNT",
                self.max_header_count,
            )
            return
        head_bytes = sum(len(name) + len(value) + 4 for name, value in headers)  # ": ", CRLF
        if head_bytes > self.max_header_bytes:
            await self._refuse_headers(
                scope,
                send,
                f"the request headers are {head_bytes} bytes long, more than the limit of "
                f"{self.max_header_bytes} (GRADUNC_MAX_HEADER_BYTES)",
                "GRADUNC_MAX_HEADER_BYTES",
                self.max_header_bytes,
            )
            return
        declared: int | None = None
        has_body = False
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                has_body = has_body or declared != 0
            elif name == b"transfer-encoding":
                has_body = True
        limit = self.max_body_bytes
        deadline = time.monotonic() + self.body_timeout_s
        received = 0
        body_done = not has_body

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if declared is not None and declared > limit:
                raise self._too_large(f"of {declared} bytes (Content-Length) is over")
            if body_done:
                return await receive()  # http.disconnect, once the response is sent
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                raise self._late() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large("exceeded")
                body_done = not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"connection", b"close")],
                }
            await send(message)

        await self.app(scope, limited_receive, closing_send)

    async def _refuse_headers(
        self, scope: Scope, send: Send, detail: str, limit: str, limit_value: int
    ) -> None:
        error = HeadersTooLarge(detail, limit=limit, limit_value=limit_value)
        body = problem_body(error, instance=scope.get("path"))
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
