"""Reading uploaded images from a request: multipart parts or a raw ``image/*`` body.

The multipart body is parsed here with python-multipart's streaming parser rather than
Starlette's form parser: every part arrives as bytes whatever its headers say (a part
without a filename is still an image), parsing stops at the first part beyond the batch
limit, and every error is one of ours with a message saying what was wrong. The body
size limit is enforced underneath, by :class:`BodySizeLimitMiddleware`, while the bytes
stream in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BadRequest, PayloadTooLarge, ServiceError

__all__ = [
    "BodySizeLimitMiddleware",
    "Part",
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


async def read_body(request: Request) -> bytes:
    return await request.body()


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


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` before they are parsed.

    A declared Content-Length over the limit fails on the first read, before any byte is
    read; a chunked (or under-declared) body fails as soon as the bytes received pass the
    limit. The error is raised from ``receive``, i.e. inside the route that reads the body,
    so it reaches the one problem+json handler and is counted under the route's name.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self, how: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body {how} the limit of {self.max_body_bytes} bytes (GRADUNC_MAX_BODY_BYTES)",
            limit="GRADUNC_MAX_BODY_BYTES",
            limit_value=self.max_body_bytes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        limit = self.max_body_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise self._too_large(f"of {declared} bytes (Content-Length) is over")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large("exceeded")
            return message

        await self.app(scope, limited_receive, send)
