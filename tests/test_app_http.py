"""The HTTP layer against a real uvicorn server on loopback, with the real model bundle.

The bundle is ``$GRADUNC_TEST_BUNDLE`` or the committed ``models/default``; a missing
bundle fails these tests (there is no service without one). The images are real MNIST
test digits (skipped, with the reason, where the data set is absent), and every answer is
checked against ``UncertaintyScorer.from_bundle(bundle).score(images)`` computed offline:
what the service says over HTTP must be what the scorer computes (DESIGN.md section 2).
The end-to-end run over all 10,000 test images is in test_app_bundle.py; hostile inputs
are in test_hostile_inputs.py.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.service import load_bundle_scorer
from scoring.features import LAYER_NAMES, METRIC_NAMES
from scoring.preprocessing import decode_image, prepare_image
from tools.harness import LoopbackServer, png_bytes

PROBLEM_JSON = "application/problem+json"
#: Offline and served numbers agree to float32 precision when the engine sees the same batch.
ATOL = 1e-5


# -- the bundle, the offline scorer and real digits -----------------------------------


@pytest.fixture(scope="module")
def mnist_test(data_dir: Path):
    from training.data.mnist import load_mnist

    return load_mnist(data_dir, "test")


@pytest.fixture(scope="module")
def digits(mnist_test) -> np.ndarray:
    """The first 48 MNIST test digits, (48, 28, 28) uint8."""
    return mnist_test.images[:48]


def raw_png(pixels: np.ndarray) -> dict[str, Any]:
    """httpx keyword arguments posting ``pixels`` as a raw image/png body."""
    return {"content": png_bytes(pixels), "headers": {"content-type": "image/png"}}


def assert_matches(served: dict, expected, *, heads: bool = True) -> None:
    """A served score object equals the offline one (``heads``: p_correct and p_ood too)."""
    if not isinstance(expected, dict):
        expected = expected.score_object()  # the runtime's ImageScore, as the service sends it
    assert served["prediction"] == expected["prediction"]
    assert served["label"] == expected["label"]
    assert served["request_id"]
    assert served["scores"].keys() == expected["scores"].keys()
    for name, value in expected["scores"].items():
        assert served["scores"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    np.testing.assert_allclose(served["probabilities"], expected["probabilities"], atol=ATOL)
    assert served["entropy"] == pytest.approx(expected["entropy"], abs=ATOL)
    assert served["softmax_baseline"] == pytest.approx(expected["softmax_baseline"], abs=ATOL)
    assert served["gradient_metrics"].keys() == expected["gradient_metrics"].keys()
    for layer, metrics in expected["gradient_metrics"].items():
        assert served["gradient_metrics"][layer].keys() == metrics.keys()
        for name, value in metrics.items():
            assert served["gradient_metrics"][layer][name] == pytest.approx(
                value, rel=1e-4, abs=1e-6
            ), (layer, name)
    if heads:
        assert served["p_correct"] == pytest.approx(expected["p_correct"], abs=ATOL)
        assert served["p_ood"] == pytest.approx(expected["p_ood"], abs=ATOL)
        assert served["is_ood"] == expected["is_ood"]
    assert served["model_version"] == expected["model_version"]


def assert_problem(response: httpx.Response, status: int, *fragments: str) -> dict:
    """``response`` is RFC 9457 problem+json with ``status`` and ``detail`` containing all."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == status
    for fragment in fragments:
        assert fragment in body["detail"], (fragment, body["detail"])
    return body


def prometheus_value(text: str, sample: str) -> float:
    """The value of one sample line (name and labels exactly as exposed) of /metrics/prometheus."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in the exposition"
    return float(match.group(1))


# -- servers -------------------------------------------------------------------------


class Servers:
    """Start servers on the real bundle with given settings; stop them all at the end."""

    def __init__(self, bundle_dir: Path, state_dir: Path) -> None:
        self.bundle_dir = bundle_dir
        self.state_dir = state_dir
        self._running: list[LoopbackServer] = []

    def start(
        self, loader: Callable[[Settings], Any] | None = None, **settings: Any
    ) -> LoopbackServer:
        settings.setdefault("bundle_dir", self.bundle_dir)
        # Each server its own live store: no SQLite file shared with other servers.
        database = self.state_dir / f"live-{len(self._running)}.sqlite3"
        settings.setdefault("database_url", f"sqlite:///{database}")
        app = create_app(Settings(**settings), scorer_loader=loader)
        server = LoopbackServer(app).start()
        self._running.append(server)
        return server

    def start_ready(self, **settings: Any) -> LoopbackServer:
        server = self.start(**settings)
        server.wait_ready()
        return server

    def stop_all(self) -> None:
        for server in self._running:
            server.stop()


@pytest.fixture(scope="module")
def servers(bundle_dir: Path, tmp_path_factory):
    pool = Servers(bundle_dir, tmp_path_factory.mktemp("http-stores"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def server(servers: Servers) -> LoopbackServer:
    """The common server: small limits so each is cheap to hit."""
    return servers.start_ready(
        max_body_bytes=200_000,
        max_image_pixels=100 * 100,
        max_batch_images=40,
        max_batch_size=8,
        queue_max=200,
    )


@pytest.fixture(scope="module")
def client(server: LoopbackServer):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def keyed_server(servers: Servers) -> LoopbackServer:
    return servers.start_ready(api_key="s3cret-key-of-16-chars")


# -- health and readiness ------------------------------------------------------------


def test_healthz_and_readyz_while_the_bundle_loads(
    servers: Servers, digits: np.ndarray, offline
) -> None:
    release = threading.Event()

    def gated_loader(settings: Settings):
        release.wait(60)  # hold the real loader back until the test has looked
        return load_bundle_scorer(settings)

    server = servers.start(loader=gated_loader)
    try:
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(server.url + "/readyz")
        body = assert_problem(ready, 503, "still loading from")
        assert body["state"] == "loading"
        assert ready.headers["retry-after"] == "1"
        scored = httpx.post(server.url + "/score", **raw_png(digits[0]))
        assert_problem(scored, 503, "still loading")
        assert scored.headers["retry-after"] == "1"
        assert_problem(httpx.get(server.url + "/metrics"), 503, "still loading")
        assert_problem(httpx.get(server.url + "/report"), 503, "still loading")
        assert_problem(httpx.get(server.url + "/report/plots/any.png"), 503, "still loading")
    finally:
        release.set()
    assert server.wait_ready()["model_version"] == offline.model_version
    scored = httpx.post(server.url + "/score", **raw_png(digits[0]))
    assert_matches(scored.json(), offline.score(digits[:1])[0])


def test_readyz_names_the_error_of_a_bundle_that_failed_to_load(
    servers: Servers, tmp_path: Path, digits: np.ndarray
) -> None:
    missing = tmp_path / "no-bundle-here"
    server = servers.start(bundle_dir=missing)  # the real loader, a real missing folder
    server.wait_settled()
    response = httpx.get(server.url + "/readyz")
    body = assert_problem(response, 503, f"failed to load from '{missing.name}'")
    assert str(missing) not in body["detail"]  # no absolute path in an answer
    assert body["state"] == "failed"
    assert "BundleError" in body["detail"] and "manifest.json" in body["detail"]
    assert "retry-after" not in response.headers  # retrying will not help
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert_problem(
        httpx.post(server.url + "/score/batch", files=[("images", png_bytes(digits[0]))]),
        503,
        "failed to load",
    )


def test_a_bundle_with_an_altered_graph_is_refused(
    servers: Servers, bundle_dir: Path, tmp_path: Path
) -> None:
    altered = tmp_path / "altered"
    shutil.copytree(bundle_dir, altered, ignore=shutil.ignore_patterns("weights", "plots"))
    graph = json.loads((altered / "manifest.json").read_text())["graphs"][0]
    with open(altered / graph, "ab") as handle:
        handle.write(b"\0")  # one byte more than the manifest's hash covers
    server = servers.start(bundle_dir=altered)
    server.wait_settled()
    body = assert_problem(
        httpx.get(server.url + "/readyz"),
        503,
        f"{graph}: SHA-256",
        "does not match the manifest",
    )
    assert body["state"] == "failed"
    assert str(altered) not in body["detail"]  # no absolute paths in answers


def test_readyz_reports_model_version_and_providers(client: httpx.Client, offline) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert body["model_version"] == offline.model_version
    assert body["providers"] == offline.providers_in_use
    assert len(body["providers"]) == len(offline.bundle.graph_paths)
    assert body["max_batch_size"] == 8


# -- scoring -----------------------------------------------------------------------------


def test_score_multipart_returns_the_score_object(
    client: httpx.Client, digits: np.ndarray, offline
) -> None:
    response = client.post(
        "/score", files={"image": ("digit.png", png_bytes(digits[0]), "image/png")}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert_matches(result, offline.score(digits[:1])[0])
    assert len(result["probabilities"]) == 10
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert set(result["gradient_metrics"]) == set(LAYER_NAMES)
    assert set(result["gradient_metrics"]["all"]) == set(METRIC_NAMES)
    assert isinstance(result["is_ood"], bool)
    assert "members" not in result


def test_score_raw_body_and_include_members(
    client: httpx.Client, digits: np.ndarray, offline
) -> None:
    response = client.post("/score", params={"include_members": "true"}, **raw_png(digits[1]))
    assert response.status_code == 200, response.text
    result = response.json()
    [expected] = offline.score(digits[1:2], include_members=True)
    assert_matches(result, expected)
    expected = expected.score_object()
    assert [member["member"] for member in result["members"]] == [
        member["member"] for member in expected["members"]
    ]
    for served_member, expected_member in zip(result["members"], expected["members"], strict=True):
        assert served_member["prediction"] == expected_member["prediction"]
        np.testing.assert_allclose(
            served_member["probabilities"], expected_member["probabilities"], atol=ATOL
        )
        assert served_member["scores"].keys() == expected_member["scores"].keys()
        for name, value in expected_member["scores"].items():
            assert served_member["scores"][name] == pytest.approx(value, rel=1e-4, abs=1e-5)


def test_a_part_without_filename_is_still_an_image(
    client: httpx.Client, digits: np.ndarray, offline
) -> None:
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\n'
        + png_bytes(digits[2])
        + b"\r\n--xyz--\r\n"
    )
    response = client.post(
        "/score", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert response.status_code == 200, response.text
    assert_matches(response.json(), offline.score(digits[2:3])[0])


def test_batch_keeps_the_order_sent_across_engine_batches(
    client: httpx.Client, digits: np.ndarray, offline
) -> None:
    order = np.random.default_rng(0).permutation(len(digits))[:40]  # 40 images
    images = digits[order]
    files = [
        ("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)
    ]
    before = client.get("/metrics/prometheus").text
    response = client.post("/score/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = offline.score(images)  # all 40 at once: the engine's batches do not matter
    assert len(results) == 40
    for served, wanted in zip(results, expected, strict=True):
        assert_matches(served, wanted)
    after = client.get("/metrics/prometheus").text
    batches = prometheus_value(after, "gradunc_batch_size_images_count") - prometheus_value(
        before, "gradunc_batch_size_images_count"
    )
    at_most_8 = prometheus_value(
        after, 'gradunc_batch_size_images_bucket{le="8.0"}'
    ) - prometheus_value(before, 'gradunc_batch_size_images_bucket{le="8.0"}')
    assert batches == at_most_8 == 5


def test_a_digit_scores_the_same_alone_and_inside_a_batch(
    client: httpx.Client, digits: np.ndarray
) -> None:
    """What else is in the engine batch does not change an image's numbers."""
    alone = [client.post("/score", **raw_png(image)).json() for image in digits[:16]]
    files = [("images", png_bytes(image)) for image in digits[:16]]
    together = client.post("/score/batch", files=files).json()["results"]
    for single, batched in zip(alone, together, strict=True):
        assert_matches(batched, single)


def test_batch_include_members_only_for_the_request_that_asked(
    client: httpx.Client, digits: np.ndarray, offline
) -> None:
    files = [("images", png_bytes(image)) for image in digits[:2]]
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(client.post, "/score/batch", files=files)
        detailed = pool.submit(
            client.post, "/score/batch", files=files, params={"include_members": True}
        )
    members = len(offline.bundle.graph_paths)
    plain_results = plain.result().json()["results"]
    detailed_results = detailed.result().json()["results"]
    assert all("members" not in r for r in plain_results)
    assert all(len(r["members"]) == members for r in detailed_results)
    expected = [r.score_object() for r in offline.score(digits[:2])]
    for results in (plain_results, detailed_results):
        assert [r["prediction"] for r in results] == [r["prediction"] for r in expected]


def test_concurrent_requests_are_gathered_into_batches(
    servers: Servers, digits: np.ndarray, offline
) -> None:
    server = servers.start_ready(max_batch_size=64, max_wait_ms=50)
    images = digits[:24]
    with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda image: http.post("/score", **raw_png(image)), images))
        text = http.get("/metrics/prometheus").text
    assert [r.status_code for r in responses] == [200] * 24
    expected = offline.score(images)
    for response, wanted in zip(responses, expected, strict=True):
        assert_matches(response.json(), wanted, heads=False)
    assert prometheus_value(text, "gradunc_batch_size_images_sum") == 24
    engine_calls = prometheus_value(text, "gradunc_batch_size_images_count")
    assert engine_calls < 24, "24 concurrent requests never shared an engine call"


def test_queue_full_answers_503_with_retry_after(servers: Servers, mnist_test) -> None:
    """A tiny queue (GRADUNC_QUEUE_MAX=4) filled by a batch of large real images.

    While the four large scans decode, the queue holds 4 images; a digit posted meanwhile
    must be turned away with 503 and Retry-After, and the batch still answered in full.
    """
    server = servers.start_ready(
        max_batch_images=4, queue_max=4, max_image_pixels=10_000_000, max_body_bytes=20_000_000
    )
    scans = []
    for image in mnist_test.images[:4]:  # dark ink on a 2500x2500 white page, as JPEG
        page = Image.new("L", (2500, 2500), 255)
        page.paste(Image.fromarray(255 - image).resize((1400, 1400)), (500, 600))
        buffer = io.BytesIO()
        page.save(buffer, format="JPEG", quality=90)
        scans.append(buffer.getvalue())
    small = png_bytes(mnist_test.images[5])
    rejected: httpx.Response | None = None
    with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        for _attempt in range(5):  # each attempt leaves a window of a few hundred ms
            batch = pool.submit(http.post, "/score/batch", files=[("images", s) for s in scans])
            while not batch.done():
                depth = prometheus_value(
                    http.get("/metrics/prometheus").text, "gradunc_queue_depth_images"
                )
                if depth == 4:  # the batch is admitted and still decoding or scoring
                    answer = http.post(
                        "/score", content=small, headers={"content-type": "image/png"}
                    )
                    # 200 only if the batch left the queue meanwhile (then: try again)
                    assert answer.status_code in (200, 503), answer.text
                    if answer.status_code == 503:
                        rejected = answer
                        break
            batch_answer = batch.result()
            assert batch_answer.status_code == 200, batch_answer.text
            assert len(batch_answer.json()["results"]) == 4
            if rejected is not None:
                break
    assert rejected is not None, "the queue of 4 images never filled up"
    body = assert_problem(rejected, 503, "queue is full", "GRADUNC_QUEUE_MAX")
    assert body["limit_value"] == 4
    assert rejected.headers["retry-after"] == "1"


def test_a_large_canvas_is_preprocessed_before_scoring(
    client: httpx.Client, mnist_test, offline
) -> None:
    # A confidently recognised digit, dark on a white 100x100 page (the pixel limit).
    expected_all = [r.score_object() for r in offline.score(mnist_test.images[:200])]
    index = next(
        i
        for i, result in enumerate(expected_all)
        if result["prediction"] == mnist_test.labels[i] and result["softmax_baseline"] > 0.95
    )
    ink = Image.fromarray(255 - mnist_test.images[index]).resize((84, 84), Image.Resampling.BICUBIC)
    page = Image.new("L", (100, 100), 255)
    page.paste(ink, (10, 6))
    data = png_bytes(np.asarray(page))
    response = client.post("/score", files={"image": ("page.png", data)})
    assert response.status_code == 200, response.text
    result = response.json()
    assert_matches(result, offline.score(prepare_image(decode_image(data))[None])[0])
    assert result["prediction"] == mnist_test.labels[index]


# -- bad input: always a 4xx problem+json naming what was wrong -----------------------


def test_wrong_part_name_for_score(client: httpx.Client, digits: np.ndarray) -> None:
    response = client.post("/score", files={"file": ("d.png", png_bytes(digits[0]))})
    assert_problem(response, 422, "needs a multipart part named 'image'", "'file'")


def test_batch_part_name_sent_to_score(client: httpx.Client, digits: np.ndarray) -> None:
    files = [("images", png_bytes(digits[0])), ("images", png_bytes(digits[1]))]
    assert_problem(
        client.post("/score", files=files), 422, "part named 'image'", "POST /score/batch"
    )


def test_two_image_parts_for_score(client: httpx.Client, digits: np.ndarray) -> None:
    files = [("image", png_bytes(digits[0])), ("image", png_bytes(digits[1]))]
    assert_problem(client.post("/score", files=files), 422, "exactly one part named 'image', got 2")


def test_unexpected_extra_part_for_score(client: httpx.Client, digits: np.ndarray) -> None:
    response = client.post(
        "/score", files={"image": ("a.png", png_bytes(digits[0]))}, data={"label": "seven"}
    )
    assert_problem(response, 422, "unexpected parts named 'label'")


def test_wrong_part_name_for_batch(client: httpx.Client, digits: np.ndarray) -> None:
    response = client.post("/score/batch", files={"image": ("d.png", png_bytes(digits[0]))})
    assert_problem(response, 422, "parts named 'images'", "'image'")


def test_multipart_without_any_part(client: httpx.Client) -> None:
    response = client.post(
        "/score/batch",
        content=b"--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert_problem(response, 422, "parts found: none")


def test_unsupported_content_types(client: httpx.Client, digits: np.ndarray) -> None:
    assert_problem(
        client.post("/score", content=b"hello", headers={"content-type": "text/plain"}),
        415,
        "Content-Type 'text/plain' is not accepted",
        "part named 'image'",
    )
    assert_problem(client.post("/score", json={"image": "aGVsbG8="}), 415, "'application/json'")
    assert_problem(client.post("/score", content=b"x"), 415, "no Content-Type")
    assert_problem(
        client.post("/score/batch", **raw_png(digits[0])),
        415,
        "POST /score/batch takes multipart/form-data",
    )


def test_empty_body_and_empty_part(client: httpx.Client, digits: np.ndarray) -> None:
    assert_problem(
        client.post("/score", content=b"", headers={"content-type": "image/png"}),
        422,
        "request body is empty",
    )
    assert_problem(
        client.post("/score", files={"image": ("e.png", b"")}),
        422,
        "part 'image' ('e.png') is empty",
    )
    files = [("images", png_bytes(digits[0])), ("images", ("x.png", b""))]
    assert_problem(
        client.post("/score/batch", files=files), 422, "part 'images' #1 ('x.png') is empty"
    )


def test_undecodable_and_truncated_images(client: httpx.Client, digits: np.ndarray) -> None:
    assert_problem(
        client.post("/score", files={"image": ("notes.txt", b"definitely not an image")}),
        422,
        "part 'image' ('notes.txt'): cannot decode the image: not an image",
    )
    truncated = png_bytes(digits[0])[:60]
    assert_problem(
        client.post("/score", content=truncated, headers={"content-type": "image/png"}),
        422,
        "request body (image/png): cannot decode the image",
    )
    files = [("images", png_bytes(digits[0])), ("images", ("bad.png", b"GIF89a-nope"))]
    assert_problem(client.post("/score/batch", files=files), 422, "part 'images' #1 ('bad.png')")


def test_malformed_multipart(client: httpx.Client) -> None:
    assert_problem(
        client.post("/score", content=b"abc", headers={"content-type": "multipart/form-data"}),
        400,
        "no boundary parameter",
    )
    assert_problem(
        client.post(
            "/score",
            content=b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        400,
        "ends before the closing boundary",
    )
    assert_problem(
        client.post(
            "/score",
            content=b"--b\r\nX-Nothing: 1\r\n\r\nabc\r\n--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        400,
        "no 'Content-Disposition: form-data; name=...' header",
    )


def test_body_over_the_limit_by_content_length(client: httpx.Client) -> None:
    body = assert_problem(
        client.post("/score", content=b"\0" * 200_001, headers={"content-type": "image/png"}),
        413,
        "request body of 200001 bytes (Content-Length) is over the limit of 200000 bytes "
        "(GRADUNC_MAX_BODY_BYTES)",
    )
    assert body["limit"] == "GRADUNC_MAX_BODY_BYTES" and body["limit_value"] == 200_000


def test_chunked_body_over_the_limit(client: httpx.Client) -> None:
    def chunks():
        for _ in range(30):
            yield b"\0" * 10_000

    response = client.post("/score", content=chunks(), headers={"content-type": "image/png"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_problem(response, 413, "request body exceeded the limit of 200000 bytes")

    def multipart_chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        yield from chunks()

    response = client.post(
        "/score/batch",
        content=multipart_chunks(),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert_problem(response, 413, "GRADUNC_MAX_BODY_BYTES")


def test_image_over_the_pixel_limit(client: httpx.Client) -> None:
    big = png_bytes(np.zeros((101, 100), dtype=np.uint8))
    body = assert_problem(
        client.post("/score", files={"image": ("big.png", big)}),
        413,
        "part 'image' ('big.png'): image of 100x101 = 10100 pixels is over the limit of "
        "10000 pixels (GRADUNC_MAX_IMAGE_PIXELS)",
    )
    assert body["limit"] == "GRADUNC_MAX_IMAGE_PIXELS" and body["limit_value"] == 10_000


def test_batch_over_the_image_count_limit(client: httpx.Client, digits: np.ndarray) -> None:
    files = [("images", png_bytes(image)) for image in digits[:41]]
    body = assert_problem(
        client.post("/score/batch", files=files),
        413,
        "more than 40 images, the limit per request (GRADUNC_MAX_BATCH_IMAGES)",
    )
    assert body["limit_value"] == 40
    response = client.post("/score/batch", files=files[:40])
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 40


def test_bad_query_parameter(client: httpx.Client, digits: np.ndarray) -> None:
    body = assert_problem(
        client.post("/score", params={"include_members": "perhaps"}, **raw_png(digits[0])),
        422,
        "query parameter 'include_members'",
        "'perhaps'",
    )
    assert body["errors"][0]["loc"] == ["query", "include_members"]


def test_unknown_path_and_wrong_method(client: httpx.Client) -> None:
    assert_problem(client.get("/nowhere"), 404, "no resource at /nowhere")
    response = client.get("/score")
    assert_problem(response, 405, "method GET is not allowed on /score")


# -- API key -------------------------------------------------------------------------


def test_api_key_protects_the_scoring_endpoints(
    keyed_server: LoopbackServer, digits: np.ndarray, offline
) -> None:
    png = raw_png(digits[3])
    with httpx.Client(base_url=keyed_server.url, timeout=60) as http:
        missing = http.post("/score", **png)
        assert_problem(missing, 401, "requires an API key", "Authorization: Bearer <key>")
        assert missing.headers["www-authenticate"] == 'Bearer realm="gradient-uncertainty"'
        wrong_key = {**png["headers"], "authorization": "Bearer x"}
        wrong = http.post("/score", content=png["content"], headers=wrong_key)
        assert_problem(wrong, 401, "API key in the Authorization header is not valid")
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = http.post(
            "/score/batch",
            files=[("images", png["content"])],
            headers={"authorization": "Basic czNjcmV0LWtleQ=="},
        )
        assert_problem(basic, 401, "uses the scheme 'Basic'")
        good = http.post(
            "/score",
            content=png["content"],
            headers={**png["headers"], "authorization": "Bearer s3cret-key-of-16-chars"},
        )
        assert good.status_code == 200, good.text
        assert_matches(good.json(), offline.score(digits[3:4])[0])
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/metrics").status_code == 200


# -- reports, metrics, docs --------------------------------------------------------------


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value


def test_metrics_serves_the_evaluation_json(client: httpx.Client, bundle_dir: Path) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()  # strict JSON: a NaN in the file is served as null
    on_disk = json.loads((bundle_dir / "report" / "evaluation.json").read_text())
    assert body == _nan_to_none(on_disk)
    assert body["records"] and "known_unknowns" in body
    for record in body["records"]:
        for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
            assert set(record[key]) == {"mean", "std"}, record
    assert {record["score"] for record in body["records"]} >= {"entropy", "softmax_baseline"}


def test_report_page_and_its_plots(client: httpx.Client, bundle_dir: Path) -> None:
    page = client.get("/report")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert re.search(r'<head(\s[^>]*)?><base href="/report/">', page.text), page.text[:300]
    plots = sorted(set(re.findall(r'src="(plots/[^"]+\.png)"', page.text)))
    assert plots, "the report page shows no plots"
    for relative in plots:
        plot = client.get("/report/" + relative)
        assert plot.status_code == 200, relative
        assert plot.headers["content-type"] == "image/png"
        assert plot.content == (bundle_dir / "report" / relative).read_bytes()
    assert_problem(client.get("/report/plots/missing.png"), 404)


def test_prometheus_metrics(client: httpx.Client, digits: np.ndarray) -> None:
    assert client.post("/score", **raw_png(digits[0])).status_code == 200
    client.post("/score", content=b"", headers={"content-type": "image/png"})
    text = client.get("/metrics/prometheus").text
    assert re.search(
        r'gradunc_http_requests_total\{endpoint="/score",method="POST",status="200"\} [1-9]', text
    )
    assert 'endpoint="/score",method="POST",status="422"' in text
    assert "gradunc_http_request_duration_seconds_bucket" in text
    assert re.search(r"gradunc_batch_size_images_count [1-9]", text)
    assert re.search(r"gradunc_p_ood_count [1-9]", text)
    assert re.search(r"gradunc_p_correct_count [1-9]", text)
    assert "gradunc_queue_depth_images 0.0" in text
    assert "gradunc_model_ready 1.0" in text


def test_two_apps_in_one_process_have_their_own_registries(
    servers: Servers, digits: np.ndarray
) -> None:
    first, second = servers.start_ready(), servers.start_ready()
    assert httpx.post(first.url + "/score", **raw_png(digits[0])).status_code == 200
    assert "gradunc_p_ood_count 1.0" in httpx.get(first.url + "/metrics/prometheus").text
    assert "gradunc_p_ood_count 0.0" in httpx.get(second.url + "/metrics/prometheus").text


def test_openapi_documents_the_contract(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    score = spec["paths"]["/score"]["post"]
    assert set(score["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert "413" in score["responses"]
    assert PROBLEM_JSON in score["responses"]["413"]["content"]
    batch = spec["paths"]["/score/batch"]["post"]
    assert (
        "images" in batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    )
    result = spec["components"]["schemas"]["ScoreResult"]["properties"]
    for field in ("prediction", "probabilities", "entropy", "softmax_baseline"):
        assert field in result
    for field in ("gradient_metrics", "p_correct", "p_ood", "is_ood", "model_version"):
        assert field in result
    assert {"/healthz", "/readyz", "/metrics", "/report", "/metrics/prometheus"} <= set(
        spec["paths"]
    )
    json.dumps(spec)


# -- the example application (examples/client) ---------------------------------------


def test_example_client_against_the_service(keyed_server: LoopbackServer, offline) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "client" / "client.py"
    spec = importlib.util.spec_from_file_location("example_client", path)
    client_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client_module)
    out = io.StringIO()
    assert client_module.main(keyed_server.url, api_key="s3cret-key-of-16-chars", out=out) == 0
    lines = out.getvalue().splitlines()
    # What the client printed is what the scorer says offline about the same drawings.
    names = list(client_module.EXAMPLES)
    prepared = np.stack(
        [prepare_image(decode_image(client_module.EXAMPLES[name])) for name in names]
    )
    expected = dict(zip(names, (r.score_object() for r in offline.score(prepared)), strict=True))
    assert lines[0] == f"POST /score (seven): prediction {expected['seven']['prediction']}"
    assert len(lines) == 1 + len(names)
    for name, line in zip(names, lines[1:], strict=True):
        wanted = expected[name]
        assert line.startswith(f"{name:>6}: prediction {wanted['prediction']}  "), line
        numbers = re.search(r"p_correct (\S+)  p_ood (\S+)  -> (.*)$", line)
        assert numbers, line
        # The four drawings reach the engine as one batch, online and offline alike.
        assert float(numbers.group(1)) == pytest.approx(wanted["p_correct"], abs=0.0051)
        assert float(numbers.group(2)) == pytest.approx(wanted["p_ood"], abs=0.0051)
        assert numbers.group(3) == client_module.decide(wanted)
    with pytest.raises(client_module.ScorerError, match="401 Unauthorized: this endpoint requires"):
        client_module.main(keyed_server.url, api_key="", out=out)


@pytest.mark.parametrize("module", ["scoring", "feedback", "health", "reports", "live"])
def test_every_dependency_of_the_routes_is_a_coroutine(module: str):
    """FastAPI runs a synchronous dependency in its thread pool: two thread hops per request
    and per dependency. Made async, /score's median fell from 9.6-9.8 to 9.1-9.3 ms (two
    servers alternating, stop 27); a new synchronous one would quietly undo that."""
    import importlib
    import inspect

    from fastapi.routing import APIRoute

    router = importlib.import_module(f"app.routes.{module}").router
    routes = [route for route in router.routes if isinstance(route, APIRoute)]
    assert routes
    for route in routes:
        pending = list(route.dependant.dependencies)
        while pending:
            dependency = pending.pop()
            pending.extend(dependency.dependencies)
            call = dependency.call
            # a function, or a class instance with an async __call__ such as HTTPBearer()
            is_async = inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
                type(call).__call__
            )
            assert is_async, f"{route.path}: dependency {call!r} is synchronous"
