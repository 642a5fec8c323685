"""The loopback harness: the service on 127.0.0.1, request bodies, image files.

One copy of what the tests, ``tools.http_benchmark`` and ``tools.soak`` all need, so that
there is one way to start the service and wait for it, one multipart builder and one
place that makes (or forges) image files:

- :class:`ServerProcess` runs ``python -m app.main`` in a subprocess, so that its log,
  its exit code and its memory can be observed (faults, load, soak, benchmark);
- :class:`LoopbackServer` runs uvicorn in a background thread on an app object that the
  caller built with its own settings (HTTP tests);
- both wait for readiness with :func:`wait_settled` (GET /readyz until the bundle has
  loaded or failed);
- :func:`multipart_body` builds multipart/form-data by hand, header bytes verbatim;
- :func:`encode`, :func:`png_bytes` write real image files; :func:`png_claiming` and
  friends forge headers that claim sizes their data do not have;
- :func:`mnist_test_digits`, :func:`offline_scores` / :func:`expected_scores` and
  :func:`result_mismatch` give real digits and the offline scorer's answers (as the
  dicts a served score object is) to compare served ones with.

This package is not part of the service wheel or image: it may import ``training``.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
from PIL import Image

__all__ = [
    "REPO_ROOT",
    "TOLERANCE",
    "LoopbackServer",
    "ServerProcess",
    "as_score_object",
    "bmp_claiming",
    "encode",
    "expected_scores",
    "free_port",
    "gif_claiming",
    "jpeg_claiming",
    "mnist_test_digits",
    "multipart_body",
    "offline_scores",
    "png_bytes",
    "png_chunk",
    "png_claiming",
    "request",
    "result_mismatch",
    "wait_settled",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Largest difference allowed between a served and an offline probability.
TOLERANCE = 1e-5


# -- loopback sockets and the readiness wait ---------------------------------------------


def _loopback_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a port the OS chose."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    return listener


def free_port() -> int:
    """A loopback port free right now, for a server in another process to bind."""
    with _loopback_socket() as probe:
        return int(probe.getsockname()[1])


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout_s: float = 60,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request to 127.0.0.1:``port`` on a new connection: status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        headers = {} if content_type is None else {"Content-Type": content_type}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def wait_settled(
    port: int,
    *,
    timeout_s: float = 120,
    gone: Callable[[], str | None] = lambda: None,
) -> tuple[int, dict[str, Any]]:
    """Poll GET /readyz until the bundle has loaded (200) or failed (503, state "failed").

    Returns the status and the body. ``gone`` says why the server can no longer answer
    (it exited), or None while it runs; either that or the timeout raises RuntimeError.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if (why := gone()) is not None:
            raise RuntimeError(why)
        try:
            status, _, body = request(port, "GET", "/readyz", timeout_s=10)
            answer = json.loads(body)
            if status == 200 or answer.get("state") == "failed":
                return status, answer
        except (OSError, http.client.HTTPException, ValueError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} did not settle within {timeout_s} s")
        time.sleep(0.05)


class _Server:
    """What both servers share: a loopback port, its URL, and waiting for readiness."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _gone(self) -> str | None:
        """Why the server cannot answer any more (it exited), or None while it runs."""
        raise NotImplementedError

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def start_ready(self, timeout_s: float = 120) -> Self:
        """Start, then wait until the bundle has loaded; stopped again if it does not."""
        self.start()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def get(self, path: str, timeout_s: float = 10) -> tuple[int, http.client.HTTPMessage, bytes]:
        return request(self.port, "GET", path, timeout_s=timeout_s)

    def post(
        self, path: str, body: bytes, content_type: str, timeout_s: float = 60
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        return request(self.port, "POST", path, body, content_type, timeout_s)

    def wait_settled(self, timeout_s: float = 120) -> tuple[int, dict[str, Any]]:
        """Status and body of GET /readyz once the bundle has loaded or failed to load."""
        return wait_settled(self.port, timeout_s=timeout_s, gone=self._gone)

    def wait_ready(self, timeout_s: float = 120) -> dict[str, Any]:
        """The body of GET /readyz once the bundle has loaded; RuntimeError if it failed."""
        status, answer = self.wait_settled(timeout_s)
        if status != 200:
            raise RuntimeError(f"the server could not load the bundle: {answer}")
        return answer


# -- the service in a subprocess --------------------------------------------------------


class ServerProcess(_Server):
    """``python -m app.main`` on 127.0.0.1 in a subprocess; its log goes to ``log_path``.

    The environment is the parent's without any ``GRADUNC_*`` setting (so a developer's
    own settings do not leak in; ``GRADUNC_DATA_DIR`` is kept), plus ``settings`` as
    ``GRADUNC_<NAME>`` variables.
    """

    def __init__(
        self,
        bundle_dir: Path | str,
        log_path: Path | str,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = Path(log_path)
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("GRADUNC_") or key == "GRADUNC_DATA_DIR"
        }
        self.environment = {
            **environment,
            "GRADUNC_HOST": "127.0.0.1",
            "GRADUNC_PORT": str(self.port),
            "GRADUNC_BUNDLE_DIR": str(bundle_dir),
            **{f"GRADUNC_{name.upper()}": str(value) for name, value in (settings or {}).items()},
        }
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the server was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "app.main"],
                env=self.environment,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def _gone(self) -> str | None:
        if self.process.poll() is None:
            return None
        return (
            f"the server exited with code {self.process.returncode}; its log:\n"
            + (self.log()[-4000:])
        )

    def wait_settled(self, timeout_s: float = 120) -> tuple[int, dict[str, Any]]:
        try:
            return super().wait_settled(timeout_s)
        except RuntimeError as error:
            if self._gone() is not None:
                raise
            raise RuntimeError(f"{error}; its log:\n{self.log()[-4000:]}") from None

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout_s``; the exit code."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=timeout_s)
        return self._process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- an app object in a background thread ----------------------------------------------


class LoopbackServer(_Server):
    """uvicorn serving ``app`` on 127.0.0.1 with an OS-assigned port, in a daemon thread.

    For tests that need real HTTP (chunked bodies, Content-Length, sockets) on an app they
    built themselves::

        with LoopbackServer(create_app(settings)) as server:
            server.wait_ready()
            httpx.get(server.url + "/healthz")
    """

    def __init__(self, app: Any, *, log_level: str = "warning", start_timeout_s: float = 60):
        import uvicorn

        self._socket = _loopback_socket()
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._start_timeout_s = start_timeout_s

    def _gone(self) -> str | None:
        return None if self._thread.is_alive() else f"uvicorn on {self.url} has exited"

    def start(self) -> LoopbackServer:
        """Start serving; returns once uvicorn listens (the bundle may still be loading)."""
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self.server.started:
            if (why := self._gone()) is not None:
                raise RuntimeError(why + " during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on {self.url} did not start in time")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# -- request bodies -------------------------------------------------------------------


def multipart_body(
    parts: Sequence[tuple[str, str | None, bytes]],
    *,
    boundary: str | None = None,
    part_type: str = "image/png",
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type header, built by hand.

    Each part is ``(field name, file name or None, data)``. The file name goes between
    the quotes of ``filename="..."`` verbatim: not escaped, and encoded as UTF-8 with
    surrogates passed through as raw bytes, so that tests can send names (quotes, CR LF,
    NUL, invalid UTF-8) that no client library would. ``boundary`` defaults to a random
    one.
    """
    boundary = boundary or uuid.uuid4().hex
    body = bytearray()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: ".encode()
        body += disposition.encode("utf-8", "surrogateescape")
        body += f"\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


# -- image files, real and forged ---------------------------------------------------------


def encode(image: Image.Image, image_format: str = "PNG", **options: Any) -> bytes:
    """``image`` as a file of ``image_format`` (Pillow's save ``options``)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` ((H, W) or (H, W, 3) uint8) as a PNG file."""
    return encode(Image.fromarray(pixels))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims ``width`` x ``height`` 8-bit gray pixels, with
    no pixel data worth the name: what a decompression bomb looks like before decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    """A real 1x1 GIF whose logical screen claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("L", (1, 1), 0), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A real 1x1 BMP whose header claims ``width`` x ``height`` (negative: top-down)."""
    data = bytearray(encode(Image.new("L", (1, 1), 0), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose start-of-frame segment claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("L", (16, 16), 0), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# -- real digits and what the offline scorer says about them ------------------------------


def mnist_test_digits(count: int, data_dir: Path | str | None = None) -> np.ndarray:
    """The first ``count`` MNIST test digits, (count, 28, 28) uint8.

    ``data_dir`` defaults to $GRADUNC_DATA_DIR, else ../shared/datasets; a missing data
    set raises the loader's error, which names the file it looked for.
    """
    from training.data.base import resolve_data_dir
    from training.data.mnist import load_mnist

    images: np.ndarray = load_mnist(resolve_data_dir(data_dir), "test").images
    return images[:count]


def as_score_object(result: Any) -> dict[str, Any]:
    """An answer as the service's JSON score object: the runtime's ``ImageScore`` through
    its own :meth:`~scoring.runtime.ImageScore.score_object`, a served dict as it is."""
    if hasattr(result, "score_object"):
        return result.score_object()
    return dict(result)


def offline_scores(
    scorer: Any, images: np.ndarray, *, include_members: bool = False, chunk: int = 256
) -> list[dict[str, Any]]:
    """``scorer.score`` of ``images`` (N, 28, 28) uint8 in chunks, as score-object dicts."""
    return [
        as_score_object(result)
        for start in range(0, len(images), chunk)
        for result in scorer.score(images[start : start + chunk], include_members=include_members)
    ]


def expected_scores(bundle_dir: Path | str, images: np.ndarray) -> list[dict[str, Any]]:
    """What the offline scorer of the bundle answers for ``images``, in order."""
    from scoring.runtime import UncertaintyScorer

    return offline_scores(UncertaintyScorer.from_bundle(bundle_dir), images)


def result_mismatch(served: Any, expected: Mapping[str, Any]) -> str | None:
    """Why a served score object differs from the offline one, or None if it does not.

    Prediction and probabilities must agree (to :data:`TOLERANCE`); the meta heads'
    outputs may move with the batch an image is scored in and are compared elsewhere.
    """
    if not isinstance(served, dict):
        return f"not a score object: {served!r:.200}"
    if served.get("prediction") != expected["prediction"]:
        return f"prediction {served.get('prediction')!r}, offline {expected['prediction']}"
    probabilities = np.asarray(served.get("probabilities"), dtype=np.float64)
    if probabilities.shape != (10,):
        return f"probabilities of shape {probabilities.shape}"
    difference = float(np.abs(probabilities - expected["probabilities"]).max())
    if not difference <= TOLERANCE:
        return f"probabilities differ from the offline ones by up to {difference:.3g}"
    return None
