"""A corpus of hostile inputs against a real uvicorn server with the real bundle.

Issue "Hardening", items 1 and 5. Every case is one request a careless or malicious client
might send. Bad input must be answered with a 4xx ``application/problem+json`` whose
``detail`` says what was wrong; the unusual but valid images (16-bit PNG, CMYK JPEG,
palette PNG with transparency, animated GIF, odd file names) must be scored (200). After
every case the server must still score a real MNIST digit exactly as the offline scorer
does. No case may produce a 5xx: each test checks its own answer, and the last test checks
the server's own request counters.

Set ``GRADUNC_HOSTILE_REPORT=path.json`` to write the table "case -> status code".

Slow clients: a client that trickles its body within the body deadline
(GRADUNC_BODY_TIMEOUT_S, 15 s) is waited for and then answered like any other, while
others are served; ``test_a_slow_client_is_waited_for...`` holds that. What lies past the
deadlines (headers, body, idle keep-alive), oversized headers, decode bombs, aborted
uploads and the API key's throttle are the cases of ``tests/test_hardening.py``, against
the service as ``gradient-uncertainty-serve`` runs it.

The server runs with small limits (1 MB body, 4 megapixels, 8 images per batch) so that
each limit is cheap to hit; the mechanics are those of the production defaults.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.main import create_app
from tools.harness import (
    LoopbackServer,
    bmp_claiming,
    encode,
    gif_claiming,
    jpeg_claiming,
    multipart_body,
    offline_scores,
    png_chunk,
    png_claiming,
)

PROBLEM_JSON = "application/problem+json"
ATOL = 1e-5
MAX_BODY_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 4_000_000
MAX_BATCH_IMAGES = 8
API_KEY = "hostile-test-key-0123456789"

#: The real constant-time comparison, before a test wraps it to watch the calls.
COMPARE_DIGEST = secrets.compare_digest

#: case -> status code, for GRADUNC_HOSTILE_REPORT and the final no-5xx check.
OUTCOMES: dict[str, int] = {}


# -- the bundle, real digits, the servers ------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A real MNIST test digit the bundle classifies correctly, and its offline score."""

    pixels: np.ndarray  # (28, 28) uint8
    label: int
    expected: dict[str, Any]  # offline score of the digit alone

    @property
    def png(self) -> bytes:
        return encode(Image.fromarray(self.pixels))


@pytest.fixture(scope="module")
def probes(mnist_test, offline) -> list[Probe]:
    """Three confidently and correctly classified MNIST test digits."""
    chosen: list[Probe] = []
    for index, result in enumerate(offline_scores(offline, mnist_test.images[:300])):
        label = int(mnist_test.labels[index])
        if result["prediction"] == label and result["softmax_baseline"] > 0.95:
            [alone] = offline_scores(offline, mnist_test.images[index : index + 1])
            chosen.append(Probe(mnist_test.images[index], label, alone))
        if len(chosen) == 3:
            return chosen
    pytest.fail("the bundle classifies fewer than 3 of the first 300 MNIST test digits surely")


@pytest.fixture(scope="module")
def probe(probes: list[Probe]) -> Probe:
    return probes[0]


def start_server(bundle_dir: Path, **settings: Any) -> LoopbackServer:
    return LoopbackServer(create_app(Settings(bundle_dir=bundle_dir, **settings))).start_ready()


@pytest.fixture(scope="module")
def server(bundle_dir: Path) -> Iterator[LoopbackServer]:
    running = start_server(
        bundle_dir,
        max_body_bytes=MAX_BODY_BYTES,
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_request_pixels=MAX_IMAGE_PIXELS,
        max_batch_images=MAX_BATCH_IMAGES,
        max_batch_size=8,
        queue_max=64,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_server(bundle_dir: Path) -> Iterator[LoopbackServer]:
    # A generous throttle: this module sends many wrong keys on purpose.
    running = start_server(bundle_dir, api_key=API_KEY, auth_max_failures=1000)
    yield running
    running.stop()


@pytest.fixture(scope="module", autouse=True)
def hostile_report() -> Iterator[dict[str, int]]:
    """Write the table case -> status to $GRADUNC_HOSTILE_REPORT after the module."""
    OUTCOMES.clear()
    yield OUTCOMES
    target = os.environ.get("GRADUNC_HOSTILE_REPORT")
    if target:
        Path(target).write_text(json.dumps(OUTCOMES, indent=2, ensure_ascii=False) + "\n")


# -- building hostile bodies ------------------------------------------------------------


def png_with_text_bomb(png: bytes) -> bytes:
    """``png`` with a 50 KB zTXt chunk that inflates to 50 MB of text."""
    bomb = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))
    return png[:33] + bomb + png[33:]  # right after the 33-byte signature and IHDR


def upscaled(probe: Probe, size: int = 112) -> Image.Image:
    return Image.fromarray(probe.pixels).resize((size, size), Image.Resampling.BICUBIC)


def grey_palette(pixels: np.ndarray) -> Image.Image:
    """``pixels`` as a palette image whose palette is the 256 grey levels (lossless)."""
    image = Image.new("P", (pixels.shape[1], pixels.shape[0]))
    image.putpalette([level for grey in range(256) for level in (grey, grey, grey)])
    image.putdata(pixels.ravel().tolist())
    return image


def multipart(parts: list[tuple[str, str | None, bytes]]) -> dict[str, Any]:
    """httpx keyword arguments for a hand-built multipart body: (name, file name, data).

    The file name goes into the header verbatim (no escaping), which is the point.
    """
    body, content_type = multipart_body(
        parts, boundary="hostile-boundary", part_type="application/octet-stream"
    )
    return {"content": body, "headers": {"content-type": content_type}}


def raw(data: bytes, content_type: str | None) -> dict[str, Any]:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": data, "headers": headers}


# -- the corpus -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile request and what the answer must be."""

    path: str
    request: Callable[[Probe], dict[str, Any]]  # probe -> httpx keyword arguments
    status: int
    detail: tuple[str, ...] = ()  # fragments the problem detail must contain
    #: for a 200: the 28x28 image the service must see, to compare with the offline scorer
    same_as: Callable[[Probe], np.ndarray] | None = None


def _valid(request: Callable[[Probe], dict[str, Any]], same_digit: bool = True) -> Case:
    return Case("/score", request, 200, same_as=(lambda p: p.pixels) if same_digit else None)


def _filename(name: str) -> Callable[[Probe], dict[str, Any]]:
    return lambda p: multipart([("image", name, p.png)])


def _filename_on_garbage(name: str) -> Callable[[Probe], dict[str, Any]]:
    return lambda p: multipart([("image", name, b"no image in here")])


LONG_NAME = "d" * 300 + ".png"  # longer than most file systems allow, still one header line
HUGE_NAME = "d" * 5000 + ".png"  # past the multipart parser's header limit

CASES: dict[str, Case] = {
    # nothing, or not an image
    "empty body (image/png)": Case(
        "/score", lambda p: raw(b"", "image/png"), 422, ("request body is empty", "0 bytes")
    ),
    "empty body, no Content-Type": Case(
        "/score", lambda p: raw(b"", None), 415, ("no Content-Type",)
    ),
    "empty multipart part": Case(
        "/score",
        lambda p: multipart([("image", "e.png", b"")]),
        422,
        ("part 'image' ('e.png') is empty",),
    ),
    "text posted as image/png": Case(
        "/score",
        lambda p: raw(b"hello, this is text", "image/png"),
        422,
        ("cannot decode the image", "not an image in a supported format", "b'hello, t'"),
    ),
    "HTML posted as a part": Case(
        "/score",
        lambda p: multipart([("image", "x.png", b"<html><body>hi</body></html>")]),
        422,
        ("part 'image' ('x.png')", "not an image in a supported format"),
    ),
    # broken images
    "truncated PNG": Case(
        "/score",
        lambda p: raw((d := encode(upscaled(p)))[: len(d) // 2], "image/png"),
        422,
        ("cannot decode the image", "truncated or corrupt PNG image data (112x112)"),
    ),
    "truncated JPEG": Case(
        "/score",
        lambda p: raw((d := encode(upscaled(p), "JPEG"))[: len(d) // 2], "image/jpeg"),
        422,
        ("cannot decode the image", "truncated or corrupt JPEG image data (112x112)"),
    ),
    "JPEG cut inside its header": Case(
        "/score",
        lambda p: raw(encode(upscaled(p), "JPEG")[:120], "image/jpeg"),
        422,
        ("cannot decode the image: corrupt image header",),
    ),
    "PNG with a zTXt decompression bomb": Case(
        "/score",
        lambda p: raw(png_with_text_bomb(p.png), "image/png"),
        422,
        ("cannot decode the image", "Decompressed data too large"),
    ),
    # decompression bombs and huge dimensions: refused from the header, 413
    "PNG header claiming 100000x100000": Case(
        "/score",
        lambda p: raw(png_claiming(100_000, 100_000), "image/png"),
        413,
        ("pixels is over the limit of 4000000 pixels", "GRADUNC_MAX_IMAGE_PIXELS"),
    ),
    "blank 5000x5000 PNG (highly compressible)": Case(
        "/score",
        lambda p: raw(encode(Image.new("L", (5000, 5000), 255)), "image/png"),
        413,
        ("image of 5000x5000 = 25000000 pixels is over the limit of 4000000 pixels",),
    ),
    "GIF claiming 65535x65535": Case(
        "/score",
        lambda p: raw(gif_claiming(65535, 65535), "image/gif"),
        413,
        ("pixels is over the limit", "GRADUNC_MAX_IMAGE_PIXELS"),
    ),
    "JPEG claiming 65500x65500": Case(
        "/score",
        lambda p: raw(jpeg_claiming(65500, 65500), "image/jpeg"),
        413,
        ("pixels is over the limit", "GRADUNC_MAX_IMAGE_PIXELS"),
    ),
    "BMP claiming 100000x100000": Case(
        "/score",
        lambda p: raw(bmp_claiming(100_000, 100_000), "image/bmp"),
        413,
        ("pixels is over the limit", "GRADUNC_MAX_IMAGE_PIXELS"),
    ),
    "PNG claiming 3000x3000 (under Pillow's own limit)": Case(
        "/score",
        lambda p: raw(png_claiming(3000, 3000), "image/png"),
        413,
        ("image of 3000x3000 = 9000000 pixels is over the limit of 4000000 pixels",),
    ),
    "BMP claiming 1000x1000, 4 pixels of data": Case(
        "/score",
        lambda p: raw(bmp_claiming(1000, -1000), "image/bmp"),
        422,
        ("truncated or corrupt BMP image data (1000x1000)",),
    ),
    # unusual but valid images: scored
    "16-bit grayscale PNG": _valid(
        lambda p: raw(encode(Image.fromarray(p.pixels.astype(np.uint16) * 257)), "image/png")
    ),
    "CMYK JPEG": _valid(
        lambda p: raw(encode(upscaled(p).convert("CMYK"), "JPEG", quality=95), "image/jpeg"),
        same_digit=False,
    ),
    "palette PNG with a transparent background": _valid(
        lambda p: raw(encode(grey_palette(p.pixels), transparency=0), "image/png")
    ),
    "animated GIF (3 frames)": _valid(
        lambda p: raw(
            encode(
                Image.fromarray(p.pixels),
                "GIF",
                save_all=True,
                append_images=[Image.fromarray(255 - p.pixels), Image.new("L", (28, 28), 128)],
                duration=100,
                loop=0,
            ),
            "image/gif",
        )
    ),
    "extreme aspect ratio 20000x2": _valid(
        lambda p: raw(encode(Image.new("L", (20_000, 2), 0)), "image/png"), same_digit=False
    ),
    # formats the service does not read
    "SVG as image/svg+xml": Case(
        "/score",
        lambda p: raw(
            b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28">'
            b'<path d="M14 4v20" stroke="white"/></svg>',
            "image/svg+xml",
        ),
        422,
        ("not an image in a supported format", "it looks like an SVG drawing"),
    ),
    "SVG with an XML prolog, as a part": Case(
        "/score",
        lambda p: multipart([("image", "seven.svg", b'<?xml version="1.0"?>\n<svg xmlns="x"/>')]),
        422,
        ("part 'image' ('seven.svg')", "it looks like an SVG drawing"),
    ),
    # wrong content types
    "text/plain body": Case(
        "/score", lambda p: raw(p.png, "text/plain"), 415, ("Content-Type 'text/plain'",)
    ),
    "application/octet-stream body": Case(
        "/score",
        lambda p: raw(p.png, "application/octet-stream"),
        415,
        ("Content-Type 'application/octet-stream' is not accepted", "image/* Content-Type"),
    ),
    "urlencoded form": Case(
        "/score",
        lambda p: {"data": {"image": "aGVsbG8="}},
        415,
        ("'application/x-www-form-urlencoded' is not accepted",),
    ),
    "multipart/mixed": Case(
        "/score/batch",
        lambda p: raw(b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/mixed; boundary=b"),
        415,
        ("'multipart/mixed' is not accepted", "POST /score/batch takes multipart/form-data"),
    ),
    "multipart without boundary": Case(
        "/score", lambda p: raw(p.png, "multipart/form-data"), 400, ("no boundary parameter",)
    ),
    "multipart boundary of 257 characters": Case(
        "/score",
        lambda p: raw(
            b"--" + b"b" * 257 + b"\r\n\r\nx\r\n--" + b"b" * 257 + b"--\r\n",
            "multipart/form-data; boundary=" + "b" * 257,
        ),
        400,
        ("the multipart boundary is 257 characters long, more than the limit of 256",),
    ),
    # the decode budget (round 2): frames and the request's total, from the headers
    "GIF declaring 101 frames": Case(
        "/score",
        lambda p: raw(
            encode(
                Image.new("L", (4, 4), 0),
                "GIF",
                save_all=True,
                append_images=[Image.new("L", (4, 4), (3 * i) % 256) for i in range(1, 101)],
            ),
            "image/gif",
        ),
        413,
        ("GIF animation of 101 frames is over the limit of 100 frames", "MAX_IMAGE_FRAMES"),
    ),
    "batch of 8 images of 1000x1000 over a 4 megapixel budget": Case(
        "/score/batch",
        lambda p: multipart(
            [("images", f"{i}.png", encode(Image.new("L", (1000, 1000), 0))) for i in range(8)]
        ),
        413,
        ("8 images of 8000000 pixels in all", "GRADUNC_MAX_REQUEST_PIXELS"),
    ),
    "multipart cut before the closing boundary": Case(
        "/score",
        lambda p: raw(
            b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + p.png,
            "multipart/form-data; boundary=b",
        ),
        400,
        ("ends before the closing boundary",),
    ),
    # limits
    "body over the limit (Content-Length)": Case(
        "/score",
        lambda p: raw(b"\0" * (8 * MAX_BODY_BYTES), "image/png"),
        413,
        ("request body of 8000000 bytes (Content-Length) is over the limit of 1000000 bytes",),
    ),
    "body over the limit (chunked)": Case(
        "/score/batch",
        lambda p: {
            "content": iter(
                [b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n']
                + [b"\0" * 100_000] * 80
            ),
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
        413,
        ("request body exceeded the limit of 1000000 bytes", "GRADUNC_MAX_BODY_BYTES"),
    ),
    "9 images in a batch (limit 8)": Case(
        "/score/batch",
        lambda p: multipart([("images", f"{i}.png", p.png) for i in range(9)]),
        413,
        ("more than 8 images, the limit per request (GRADUNC_MAX_BATCH_IMAGES)",),
    ),
    "part named 'file' instead of 'image'": Case(
        "/score",
        lambda p: multipart([("file", "d.png", p.png)]),
        422,
        ("needs a multipart part named 'image'", "parts found: 'file'"),
    ),
    "part named 'image' sent to the batch endpoint": Case(
        "/score/batch",
        lambda p: multipart([("image", "d.png", p.png)]),
        422,
        ("needs one or more multipart parts named 'images'", "parts found: 'image'"),
    ),
    # odd file names on a valid image: scored, the name is only a label
    "file name: unicode": _valid(_filename("数字 ü ✓.png")),
    "file name: ../../etc/passwd": _valid(_filename("../../etc/passwd")),
    "file name: 300 characters": _valid(_filename(LONG_NAME)),
    "file name: empty": _valid(_filename("")),
    "file name: quotes and semicolons": _valid(_filename('a\\"b;c=d; e.png')),
    "file name: escaped CR LF": _valid(_filename("a%0D%0AX-Evil: 1.png")),
    "file name: backslash-escaped CR LF": _valid(_filename("a\\r\\nX-Evil: 1.png")),
    "file name: raw CR LF (header injection)": _valid(_filename("a\r\nX-Evil: 1.png")),
    "file name: NUL byte": _valid(_filename("a\x00b.png")),
    "file name: invalid UTF-8": _valid(_filename("\udcff\udcfe.png")),
    # odd file names on garbage: the 422 names the file, quoted
    "file name ../../etc/passwd on garbage": Case(
        "/score",
        _filename_on_garbage("../../etc/passwd"),
        422,
        ("part 'image' ('../../etc/passwd'): cannot decode the image",),
    ),
    "file name with escaped CR LF on garbage": Case(
        "/score",
        _filename_on_garbage("a\\r\\nX-Evil: 1.png"),
        422,
        ("cannot decode the image", "X-Evil"),
    ),
    "file name: 5000 characters": Case(
        "/score",
        _filename(HUGE_NAME),
        400,
        ("a part header is longer than", "very long filename"),
    ),
}


# -- checks -----------------------------------------------------------------------------


def assert_problem(response: httpx.Response, status: int, fragments: tuple[str, ...]) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == status and body["detail"], body
    for fragment in fragments:
        assert fragment in body["detail"], (fragment, body["detail"])
    return body


def assert_valid_score(result: dict, model_version: str) -> None:
    """A complete score object of the HTTP contract with sane values."""
    assert 0 <= result["prediction"] <= 9
    probabilities = np.array(result["probabilities"])
    assert probabilities.shape == (10,) and (probabilities >= 0).all()
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert result["prediction"] == int(probabilities.argmax())
    assert 0 <= result["p_correct"] <= 1 and 0 <= result["p_ood"] <= 1
    assert isinstance(result["is_ood"], bool)
    assert np.isfinite(result["entropy"]) and np.isfinite(result["softmax_baseline"])
    assert set(result["gradient_metrics"]) >= {"all"}
    for metrics in result["gradient_metrics"].values():
        assert all(np.isfinite(value) for value in metrics.values()), metrics
    assert result["model_version"] == model_version


def assert_same_score(served: dict, expected: dict) -> None:
    assert served["prediction"] == expected["prediction"]
    np.testing.assert_allclose(served["probabilities"], expected["probabilities"], atol=ATOL)
    assert served["p_ood"] == pytest.approx(expected["p_ood"], abs=ATOL)
    assert served["p_correct"] == pytest.approx(expected["p_correct"], abs=ATOL)
    assert served["model_version"] == expected["model_version"]


def assert_still_serving(url: str, probe: Probe, headers: dict[str, str] | None = None) -> None:
    """The next normal request, on a new connection, is scored exactly as offline."""
    response = httpx.post(
        url + "/score",
        content=probe.png,
        headers={"content-type": "image/png", **(headers or {})},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["prediction"] == probe.label
    assert_same_score(response.json(), probe.expected)


# -- the tests --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name: str, server: LoopbackServer, probe: Probe, offline) -> None:
    case = CASES[name]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post(case.path, **case.request(probe))
    OUTCOMES[name] = response.status_code
    assert response.status_code < 500, response.text
    assert "x-evil" not in response.headers  # nothing from the body reaches the headers
    if case.status == 200:
        assert response.status_code == 200, response.text
        result = response.json()
        assert_valid_score(result, offline.model_version)
        if case.same_as is not None:  # decoded to exactly the digit: the offline numbers
            assert_same_score(result, offline_scores(offline, case.same_as(probe)[None])[0])
    else:
        assert_problem(response, case.status, case.detail)
    assert_still_serving(server.url, probe)


def test_a_bomb_is_reported_with_the_size_its_header_claims(server: LoopbackServer) -> None:
    response = httpx.post(
        server.url + "/score",
        content=png_claiming(100_000, 100_000),
        headers={"content-type": "image/png"},
    )
    detail = assert_problem(response, 413, ("GRADUNC_MAX_IMAGE_PIXELS",))["detail"]
    assert "2147483647" not in detail
    assert "100000x100000" in detail or "10000000000 pixels" in detail, detail


def test_a_slow_client_is_waited_for_while_others_are_served(
    server: LoopbackServer, probes: list[Probe]
) -> None:
    """A body trickled over ~2 s is answered correctly; meanwhile others are answered."""
    slow, other = probes[0], probes[1]
    data = slow.png
    pieces = 40
    step = -(-len(data) // pieces)
    progress = {"sent": 0}

    def trickle() -> Iterator[bytes]:
        for start in range(0, len(data), step):
            time.sleep(2.0 / pieces)
            progress["sent"] = start + step
            yield data[start : start + step]

    outcome: dict[str, Any] = {}

    def post_slowly() -> None:
        response = httpx.post(
            server.url + "/score",
            content=trickle(),
            headers={"content-type": "image/png"},
            timeout=60,
        )
        outcome["response"] = response
        outcome["finished"] = time.monotonic()

    thread = threading.Thread(target=post_slowly)
    thread.start()
    try:
        while progress["sent"] < step * 5:  # the slow body has started arriving
            time.sleep(0.01)
        for probe in (other, slow, other):  # three whole requests while it trickles
            assert_still_serving(server.url, probe)
        assert "response" not in outcome, "the slow client finished before the others"
    finally:
        thread.join(30)
    assert not thread.is_alive()
    response = outcome["response"]
    OUTCOMES[f"slow client (body trickled over ~2 s in {pieces} pieces)"] = response.status_code
    assert response.status_code == 200, response.text
    assert response.json()["prediction"] == slow.label
    assert_same_score(response.json(), slow.expected)
    assert_still_serving(server.url, slow)


@pytest.mark.parametrize(
    "path",
    [
        "/report/plots/%2e%2e/%2e%2e/manifest.json",
        "/report/plots/..%2f..%2fmanifest.json",
        "/report/plots/%2e%2e/evaluation.json",
        "/report/plots/%00.png",
    ],
)
def test_report_plots_do_not_leave_their_folder(
    server: LoopbackServer, probe: Probe, path: str
) -> None:
    response = httpx.get(server.url + path)
    OUTCOMES[f"GET {path}"] = response.status_code
    assert response.status_code in (400, 404), response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert "bundle_version" not in response.text and "records" not in response.text
    assert_still_serving(server.url, probe)


# -- the API key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "authorization", "fragment"),
    [
        ("no Authorization header", None, "requires an API key"),
        ("Bearer without a token", "Bearer", "requires an API key"),
        ("wrong key", "Bearer wrong", "API key in the Authorization header is not valid"),
        ("wrong key of the same length", "Bearer " + "x" * len(API_KEY), "is not valid"),
        ("a prefix of the key", "Bearer " + API_KEY[:-1], "is not valid"),
        ("the key plus one character", "Bearer " + API_KEY + "0", "is not valid"),
        ("the key in another case", "Bearer " + API_KEY.upper(), "is not valid"),
        ("non-ASCII key", "Bearer ключ".encode(), "is not valid"),
        ("the key as Basic credentials", "Basic " + API_KEY, "uses the scheme 'Basic'"),
        ("the key without a scheme", API_KEY, "the Authorization header has no scheme"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/score", "/score/batch"])
def test_the_api_key_guards_the_scoring_endpoints(
    keyed_server: LoopbackServer,
    probe: Probe,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
    name: str,
    authorization: str | bytes | None,
    fragment: str,
) -> None:
    compared: list[tuple[bytes, bytes]] = []

    def recording_compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return COMPARE_DIGEST(a, b)

    monkeypatch.setattr("app.auth.secrets.compare_digest", recording_compare_digest)
    headers: dict[str, Any] = {} if authorization is None else {"authorization": authorization}
    if endpoint == "/score":
        request = raw(probe.png, "image/png")
    else:
        request = multipart([("images", "d.png", probe.png)])
    request["headers"] = {**request["headers"], **headers}
    response = httpx.post(keyed_server.url + endpoint, **request)
    OUTCOMES[f"API key: {name} ({endpoint})"] = response.status_code
    assert_problem(response, 401, (fragment,))
    assert response.headers["www-authenticate"].startswith('Bearer realm="gradient-uncertainty"')
    assert API_KEY not in response.text
    if "is not valid" in fragment:  # a key was offered: compared in constant time
        assert len(compared) == 1 and compared[0][1] == API_KEY.encode()
    assert_still_serving(keyed_server.url, probe, {"authorization": f"Bearer {API_KEY}"})


def test_the_api_key_is_accepted_and_only_guards_scoring(
    keyed_server: LoopbackServer, probe: Probe
) -> None:
    for scheme in ("Bearer", "bearer"):  # RFC 6750: the scheme is case-insensitive
        assert_still_serving(keyed_server.url, probe, {"authorization": f"{scheme} {API_KEY}"})
    batch = httpx.post(
        keyed_server.url + "/score/batch",
        **{
            **(body := multipart([("images", None, probe.png)])),
            "headers": {**body["headers"], "authorization": f"Bearer {API_KEY}"},
        },
    )
    assert batch.status_code == 200, batch.text
    assert_same_score(batch.json()["results"][0], probe.expected)
    for path in ("/healthz", "/readyz", "/metrics", "/metrics/prometheus", "/openapi.json"):
        assert httpx.get(keyed_server.url + path).status_code == 200, path


# -- nothing uploads or replaces a model -------------------------------------------------

#: Every route of the API: (path, method). Nothing else may exist.
DOCUMENTED_ROUTES = {
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/score", "post"),
    ("/score/batch", "post"),
    ("/metrics", "get"),
    ("/metrics/prometheus", "get"),
    ("/report", "get"),
    ("/feedback", "post"),  # ground truth for served answers (the live store)
    ("/metrics/live", "get"),
}


def every_route(routes: list[Any], prefix: str = "") -> set[tuple[str, str]]:
    """(path, method) of every route, "mount" for a mounted app; included routers walked."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        included = getattr(route, "original_router", None)  # newer FastAPI wraps them
        if included is not None:
            context_prefix = getattr(getattr(route, "include_context", None), "prefix", "")
            found |= every_route(included.routes, prefix + context_prefix)
            continue
        methods = getattr(route, "methods", None) or {"MOUNT"}
        found |= {(prefix + route.path, method.lower()) for method in methods}
    return found


def test_the_api_has_only_the_documented_routes(server: LoopbackServer) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert documented == DOCUMENTED_ROUTES
    assert {path for path, method in documented if method != "get"} == {
        "/score",
        "/score/batch",
        "/feedback",
    }
    # The routes the app really has, including those left out of the schema.
    routes = every_route(server.server.config.app.routes)
    assert routes >= DOCUMENTED_ROUTES
    undocumented = routes - DOCUMENTED_ROUTES
    assert undocumented == {
        ("/openapi.json", "get"),
        ("/openapi.json", "head"),
        # fastapi-offline's pages are GET routes only (FastAPI's own also answered HEAD).
        ("/docs", "get"),
        ("/docs/oauth2-redirect", "get"),
        ("/redoc", "get"),
        ("/report/plots", "mount"),  # read-only static files of the loaded bundle
        ("/", "get"),  # redirects to /docs
        ("/docs/assets", "mount"),  # Swagger UI's files from the fastapi-offline package
    }, undocumented


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/bundle"),
        ("PUT", "/bundle"),
        ("POST", "/models"),
        ("POST", "/models/default"),
        ("PUT", "/models/default/graphs/member_0.onnx"),
        ("POST", "/admin"),
        ("POST", "/admin/reload"),
        ("POST", "/reload"),
        ("POST", "/upload"),
        ("PUT", "/score"),
        ("DELETE", "/score"),
        ("PATCH", "/score/batch"),
        ("POST", "/metrics"),
        ("POST", "/readyz"),
        ("POST", "/report"),
        ("PUT", "/report/plots/new.png"),
        ("POST", "/report/plots/roc.png"),
        ("DELETE", "/report/plots/roc.png"),
    ],
)
def test_no_route_uploads_or_replaces_a_model(
    server: LoopbackServer, probe: Probe, method: str, path: str
) -> None:
    response = httpx.request(
        method,
        server.url + path,
        content=b"\x08ONNX-model-bytes",
        headers={"content-type": "application/octet-stream"},
    )
    OUTCOMES[f"{method} {path}"] = response.status_code
    assert response.status_code in (404, 405), response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert_still_serving(server.url, probe)


# -- last: the whole corpus ------------------------------------------------------------


def test_no_hostile_input_caused_a_5xx(
    server: LoopbackServer, keyed_server: LoopbackServer, probe: Probe
) -> None:
    """Runs last: the table has no 5xx, and neither have the servers' own counters.

    Asks for ``probe`` because the cases above do: without the real MNIST digits they
    skip, and so does this check of their table."""
    assert OUTCOMES, "run with the rest of the module"
    server_errors = {case: status for case, status in OUTCOMES.items() if status >= 500}
    assert not server_errors
    for running in (server, keyed_server):
        text = httpx.get(running.url + "/metrics/prometheus").text
        sample = r'gradunc_http_requests_total\{endpoint="([^"]*)",method="\w+",status="(\d+)"\}'
        counted = re.findall(sample + r" (\S+)", text)
        assert counted, text[:500]
        # /readyz answers 503 while the bundle loads at start-up: that is its job.
        errors = [row for row in counted if row[1].startswith("5") and row[0] != "/readyz"]
        assert not errors, counted
