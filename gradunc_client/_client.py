"""Synchronous and asynchronous clients of the scoring service, on httpx.

Both build the same requests (``_Requests``) and differ only in how they send them. A
503 with ``Retry-After`` (bundle still loading, queue full) is retried after the time
the service asks for, capped at ``max_retry_wait_s``, at most ``max_retries`` times; a
503 without it (the bundle failed to load) is raised at once, because waiting will not
help. Every other error answer raises :class:`ScoringError` with the problem's detail.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx

from gradunc_client._errors import error_from_response
from gradunc_client._images import ImageInput, to_upload
from gradunc_client._types import FeedbackItem, Score

__all__ = ["DEFAULT_URL", "AsyncScoringClient", "ScoringClient"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Images per POST /score/batch request: well under the service's default limit (256).
DEFAULT_CHUNK_SIZE = 64


def _is_problem(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("application/problem+json")


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The wait a 503 asks for (Retry-After as seconds or as an HTTP date), or None."""
    header = response.headers.get("retry-after")
    if header is None:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Requests:
    """Validated options and the requests both clients send."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        max_retry_wait_s: float,
        chunk_size: int,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://; got {base_url!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0; got {max_retries!r}")
        if max_retry_wait_s < 0:
            raise ValueError(f"max_retry_wait_s must be at least 0; got {max_retry_wait_s!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1; got {chunk_size!r}")
        self.base_url = base_url.rstrip("/")
        self.headers = {"Accept": "application/json, application/problem+json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.chunk_size = chunk_size

    def closed_delay(self, attempt: int) -> float | None:
        """Seconds to wait after the server closed the connection before answering, or
        None to give up. A server that refuses early (a 503 while loading) may answer
        before the upload is complete and close the connection; the request is retried
        like a 503 (scoring is idempotent)."""
        if attempt >= self.max_retries:
            return None
        return min(0.1 * (attempt + 1), self.max_retry_wait_s)

    def retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying ``response``, or None to not retry it.

        A 5xx that is not problem+json came from a proxy in front of the service, not
        from the service (whose every answer is problem+json): e.g. Ray Serve's proxy
        answers a plain 500 for the requests inside a replica that died. It is retried
        like a closed connection (scoring is idempotent)."""
        if attempt >= self.max_retries:
            return None
        if response.status_code >= 500 and not _is_problem(response):
            return self.closed_delay(attempt)
        if response.status_code != 503:
            return None
        seconds = retry_after_seconds(response)
        return None if seconds is None else min(seconds, self.max_retry_wait_s)

    @staticmethod
    def score(image: ImageInput, include_members: bool, name: str | None) -> dict[str, Any]:
        return {
            "method": "POST",
            "url": "/score",
            "files": {"image": to_upload(image, name)},
            "params": {"include_members": "true"} if include_members else None,
        }

    @staticmethod
    def batch(
        images: Sequence[ImageInput], include_members: bool, names: Sequence[str] | None
    ) -> dict[str, Any]:
        uploads = [
            ("images", to_upload(image, names[i] if names else None))
            for i, image in enumerate(images)
        ]
        return {
            "method": "POST",
            "url": "/score/batch",
            "files": uploads,
            "params": {"include_members": "true"} if include_members else None,
        }

    @staticmethod
    def feedback(items: Iterable[FeedbackItem | Mapping[str, Any]]) -> dict[str, Any]:
        body = []
        for item in items:
            missing = {"request_id", "label", "ood"} - set(item)
            if missing:
                raise ValueError(
                    f"a feedback item needs request_id, label and ood; {dict(item)!r} lacks "
                    f"{', '.join(sorted(missing))}"
                )
            body.append({key: item[key] for key in ("request_id", "label", "ood")})
        return {"method": "POST", "url": "/feedback", "json": {"items": body}}

    def chunks(self, images: Sequence[ImageInput]) -> list[range]:
        return [
            range(start, min(start + self.chunk_size, len(images)))
            for start in range(0, len(images), self.chunk_size)
        ]


def _json(response: httpx.Response) -> Any:
    if response.is_error:
        raise error_from_response(response)
    return response.json()


class ScoringClient:
    """A blocking client::

        with ScoringClient("http://127.0.0.1:8000") as client:
            score = client.score("examples/images/digit-7.png")
            if score["is_ood"] or score["p_correct"] < 0.9:
                ...

    Parameters
    ----------
    base_url : the service, default ``http://127.0.0.1:8000``.
    api_key : sent as ``Authorization: Bearer <api_key>`` when the service requires one.
    timeout : seconds per request (connect, read, write each), default 60.
    max_retries : how often a 503 with Retry-After (or a proxy's own 5xx, or a connection
        closed before the answer) is retried, default 5.
    max_retry_wait_s : longest wait before one retry, default 30 s.
    chunk_size : images per POST /score/batch request in :meth:`score_batch`, default 64.
    transport : an httpx transport to send requests through (tests, proxies).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_retry_wait_s: float = 30.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._requests = _Requests(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait_s=max_retry_wait_s,
            chunk_size=chunk_size,
        )
        self._http = httpx.Client(
            base_url=self._requests.base_url,
            headers=self._requests.headers,
            timeout=timeout,
            transport=transport,
        )

    def _send(self, request: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(**request)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                delay = self._requests.closed_delay(attempt)
                if delay is None:
                    raise
                attempt += 1
                time.sleep(delay)
                continue
            delay = self._requests.retry_delay(response, attempt)
            if delay is None:
                return response
            attempt += 1
            time.sleep(delay)

    def score(
        self, image: ImageInput, *, include_members: bool = False, name: str | None = None
    ) -> Score:
        """Score one image (a path, file bytes or a numpy array); ``name`` labels errors."""
        return _json(self._send(self._requests.score(image, include_members, name)))

    def score_batch(
        self,
        images: Sequence[ImageInput],
        *,
        include_members: bool = False,
        names: Sequence[str] | None = None,
    ) -> list[Score]:
        """Score several images, in order, ``chunk_size`` per request."""
        results: list[Score] = []
        for part in self._requests.chunks(images):
            request = self._requests.batch(
                [images[i] for i in part],
                include_members,
                [names[i] for i in part] if names else None,
            )
            results.extend(_json(self._send(request))["results"])
        return results

    def feedback(self, items: Iterable[FeedbackItem | Mapping[str, Any]]) -> dict[str, Any]:
        """Send ground truth for scored images (POST /feedback); the service's answer."""
        return _json(self._send(self._requests.feedback(items)))

    def ready(self) -> dict[str, Any]:
        """GET /readyz: the loaded model and its providers; ScoringError while not ready."""
        return _json(self._http.get("/readyz"))

    def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> dict[str, Any]:
        """Poll /readyz until the bundle is loaded; raise the last error after ``timeout_s``.

        A bundle that failed to load (503 without Retry-After) raises at once.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = self._http.get("/readyz")
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            else:
                if response.status_code == 200:
                    return response.json()
                error = error_from_response(response)
                if response.status_code != 503 or retry_after_seconds(response) is None:
                    raise error
                if time.monotonic() > deadline:
                    raise error
            time.sleep(poll_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncScoringClient:
    """The same client for asyncio::

        async with AsyncScoringClient() as client:
            scores = await client.score_batch(paths)

    Takes the parameters of :class:`ScoringClient` (``transport`` is an async one).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_retry_wait_s: float = 30.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._requests = _Requests(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait_s=max_retry_wait_s,
            chunk_size=chunk_size,
        )
        self._http = httpx.AsyncClient(
            base_url=self._requests.base_url,
            headers=self._requests.headers,
            timeout=timeout,
            transport=transport,
        )

    async def _send(self, request: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(**request)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                delay = self._requests.closed_delay(attempt)
                if delay is None:
                    raise
                attempt += 1
                await asyncio.sleep(delay)
                continue
            delay = self._requests.retry_delay(response, attempt)
            if delay is None:
                return response
            attempt += 1
            await asyncio.sleep(delay)

    async def score(
        self, image: ImageInput, *, include_members: bool = False, name: str | None = None
    ) -> Score:
        """Score one image (a path, file bytes or a numpy array); ``name`` labels errors."""
        return _json(await self._send(self._requests.score(image, include_members, name)))

    async def score_batch(
        self,
        images: Sequence[ImageInput],
        *,
        include_members: bool = False,
        names: Sequence[str] | None = None,
    ) -> list[Score]:
        """Score several images, in order, ``chunk_size`` per request."""
        results: list[Score] = []
        for part in self._requests.chunks(images):
            request = self._requests.batch(
                [images[i] for i in part],
                include_members,
                [names[i] for i in part] if names else None,
            )
            results.extend(_json(await self._send(request))["results"])
        return results

    async def feedback(self, items: Iterable[FeedbackItem | Mapping[str, Any]]) -> dict[str, Any]:
        """Send ground truth for scored images (POST /feedback); the service's answer."""
        return _json(await self._send(self._requests.feedback(items)))

    async def ready(self) -> dict[str, Any]:
        """GET /readyz: the loaded model and its providers; ScoringError while not ready."""
        return _json(await self._http.get("/readyz"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncScoringClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
