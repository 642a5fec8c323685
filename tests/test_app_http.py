"""The HTTP layer against a real uvicorn server on loopback, with a stand-in scorer.

Everything here runs without the model bundle: the stand-in scorer echoes each image's
centre pixel (``marker``) so that tests can check order, batching and error isolation.
The end-to-end tests with the committed bundle are in test_app_bundle.py.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.loopback import LoopbackServer
from app.main import create_app
from scoring.features import LAYER_NAMES, METRIC_NAMES

PROBLEM_JSON = "application/problem+json"
POISON = 255  # a lone centre pixel of this value makes the stand-in engine fail


# -- a stand-in scorer ---------------------------------------------------------------


class EchoScorer:
    """Scores an image by its centre pixel: prediction = marker % 10, p_ood = marker / 255."""

    model_version = "echo-1"
    providers_in_use = {"member_0.onnx": "CPUExecutionProvider"}

    def __init__(self, report_dir: Path, delay_s: float = 0.0) -> None:
        self.report_dir = report_dir
        self.evaluation = {
            "records": [
                {
                    "score": "entropy",
                    "concept": "mnist_wrong",
                    "auroc": {"mean": 0.9, "std": 0.01},
                    "aupr_in": {"mean": 0.99, "std": 0.001},
                    "aupr_out": {"mean": float("nan"), "std": 0.0},
                    "fpr_at_95_tpr": {"mean": 0.3, "std": 0.02},
                }
            ],
            "known_unknowns": [],
        }
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        pass

    def score(self, images: np.ndarray, include_members: bool = False) -> list[dict]:
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        with self.lock:
            self.batch_sizes.append(len(images))
        time.sleep(self.delay_s)
        markers = images[:, 14, 14].astype(int)
        lone = images.reshape(len(images), -1).astype(int).sum(axis=1) == markers
        if ((markers == POISON) & lone).any():
            raise RuntimeError("poisoned batch")
        results = []
        for marker in markers:
            probabilities = [0.0] * 10
            probabilities[marker % 10] = 1.0
            metrics = {layer: dict.fromkeys(METRIC_NAMES, float(marker)) for layer in LAYER_NAMES}
            result = {
                "prediction": int(marker % 10),
                "probabilities": probabilities,
                "entropy": 0.0,
                "softmax_baseline": 1.0,
                "gradient_metrics": metrics,
                "p_correct": 1.0 - marker / 255,
                "p_ood": marker / 255,
                "is_ood": bool(marker > 127),
                "model_version": self.model_version,
            }
            if include_members:
                result["members"] = [
                    {"member": 0, **{k: v for k, v in result.items() if k != "model_version"}}
                ]
                del result["members"][0]["is_ood"]
            results.append(result)
        return results


def marked_png(marker: int, size: int = 28) -> bytes:
    """A white-on-black 28x28 PNG whose centre pixel is ``marker`` (passes preprocessing as is)."""
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[size // 2, size // 2] = marker
    return png_bytes(pixels)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


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


# -- servers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    report = tmp_path_factory.mktemp("report")
    (report / "plots").mkdir()
    (report / "index.html").write_text(
        "<!doctype html><html><head><title>Report</title></head><body>"
        '<table id="records"><tr><td>entropy</td></tr></table>'
        '<img src="plots/roc.png"></body></html>'
    )
    (report / "plots" / "roc.png").write_bytes(marked_png(7))
    return report


class Servers:
    """Start servers with given settings and a stand-in scorer; stop them all at the end."""

    def __init__(self, report_dir: Path) -> None:
        self.report_dir = report_dir
        self._running: list[LoopbackServer] = []

    def start(self, loader=None, scorer: EchoScorer | None = None, **settings) -> LoopbackServer:
        if loader is None:
            scorer = scorer or EchoScorer(self.report_dir)
            loader = lambda _settings: scorer  # noqa: E731
        app = create_app(Settings(**settings), scorer_loader=loader)
        server = LoopbackServer(app).start()
        server.scorer = scorer  # type: ignore[attr-defined]
        self._running.append(server)
        return server

    def start_ready(self, **kwargs) -> LoopbackServer:
        server = self.start(**kwargs)
        wait_ready(server.url)
        return server

    def stop_all(self) -> None:
        for server in self._running:
            server.stop()


def wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(url + "/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"{url} not ready after {timeout_s} s: {httpx.get(url + '/readyz').text}")


@pytest.fixture(scope="module")
def servers(report_dir: Path):
    pool = Servers(report_dir)
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
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


# -- health and readiness ------------------------------------------------------------


def test_healthz_and_readyz_while_the_bundle_loads(servers: Servers) -> None:
    release = threading.Event()
    scorer = EchoScorer(servers.report_dir)

    def slow_loader(_settings: Settings) -> EchoScorer:
        release.wait(30)
        return scorer

    server = servers.start(loader=slow_loader)
    try:
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(server.url + "/readyz")
        body = assert_problem(ready, 503, "still loading from")
        assert body["state"] == "loading"
        assert ready.headers["retry-after"] == "1"
        scored = httpx.post(
            server.url + "/score", content=marked_png(3), headers={"content-type": "image/png"}
        )
        assert_problem(scored, 503, "still loading")
        assert scored.headers["retry-after"] == "1"
        assert_problem(httpx.get(server.url + "/metrics"), 503, "still loading")
        assert_problem(httpx.get(server.url + "/report"), 503, "still loading")
    finally:
        release.set()
    wait_ready(server.url)
    assert httpx.get(server.url + "/readyz").json()["model_version"] == "echo-1"


def test_readyz_names_the_error_of_a_bundle_that_failed_to_load(
    servers: Servers, tmp_path: Path
) -> None:
    missing = tmp_path / "no-bundle-here"
    app = create_app(Settings(bundle_dir=missing))  # the real loader
    with LoopbackServer(app) as server:
        deadline = time.monotonic() + 60
        while True:
            response = httpx.get(server.url + "/readyz")
            if response.json().get("state") != "loading" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        body = assert_problem(response, 503, f"failed to load from {missing}")
        assert body["state"] == "failed"
        assert "retry-after" not in response.headers  # retrying will not help
        try:
            import scoring.runtime  # noqa: F401
        except ImportError:
            pass  # the runtime is not there yet: the import error is the reason given
        else:
            assert "BundleError" in body["detail"] and "manifest.json" in body["detail"]
        assert httpx.get(server.url + "/healthz").status_code == 200
        assert_problem(
            httpx.post(server.url + "/score/batch", files=[("images", marked_png(1))]),
            503,
            "failed to load",
        )


def test_readyz_reports_model_version_and_providers(client: httpx.Client) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert body["model_version"] == "echo-1"
    assert body["providers"] == {"member_0.onnx": "CPUExecutionProvider"}
    assert body["max_batch_size"] == 8


# -- scoring -----------------------------------------------------------------------------


def test_score_multipart_returns_the_score_object(client: httpx.Client) -> None:
    response = client.post("/score", files={"image": ("digit.png", marked_png(13), "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["prediction"] == 3
    assert result["p_ood"] == pytest.approx(13 / 255)
    assert len(result["probabilities"]) == 10
    assert set(result["gradient_metrics"]) == set(LAYER_NAMES)
    assert set(result["gradient_metrics"]["all"]) == set(METRIC_NAMES)
    assert result["model_version"] == "echo-1"
    assert isinstance(result["is_ood"], bool)
    assert "members" not in result


def test_score_raw_body_and_include_members(client: httpx.Client) -> None:
    response = client.post(
        "/score",
        params={"include_members": "true"},
        content=marked_png(21),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["prediction"] == 1
    assert [member["member"] for member in result["members"]] == [0]
    assert result["members"][0]["prediction"] == 1


def test_a_part_without_filename_is_still_an_image(client: httpx.Client) -> None:
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\n'
        + marked_png(4)
        + b"\r\n--xyz--\r\n"
    )
    response = client.post(
        "/score", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["prediction"] == 4


def test_batch_keeps_the_order_sent_across_engine_batches(
    client: httpx.Client, server: LoopbackServer
) -> None:
    markers = list(range(1, 41))[::-1]  # 40 images, engine batches of at most 8
    files = [("images", (f"{m}.png", marked_png(m), "image/png")) for m in markers]
    response = client.post("/score/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [round(r["p_ood"] * 255) for r in results] == markers
    assert max(server.scorer.batch_sizes) <= 8


def test_batch_include_members_only_for_the_request_that_asked(client: httpx.Client) -> None:
    files = [("images", marked_png(m)) for m in (5, 6)]
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(client.post, "/score/batch", files=files)
        detailed = pool.submit(
            client.post, "/score/batch", files=files, params={"include_members": True}
        )
    assert all("members" not in r for r in plain.result().json()["results"])
    assert all(len(r["members"]) == 1 for r in detailed.result().json()["results"])


def test_concurrent_requests_are_gathered_into_batches(servers: Servers) -> None:
    scorer = EchoScorer(servers.report_dir, delay_s=0.05)
    server = servers.start_ready(scorer=scorer, max_batch_size=64)
    scorer.batch_sizes.clear()
    with httpx.Client(base_url=server.url, timeout=30) as http, ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(
                lambda m: http.post(
                    "/score", content=marked_png(m), headers={"content-type": "image/png"}
                ),
                range(1, 17),
            )
        )
    assert [r.json()["prediction"] for r in responses] == [m % 10 for m in range(1, 17)]
    assert sum(scorer.batch_sizes) == 16
    assert max(scorer.batch_sizes) > 1, scorer.batch_sizes


def test_an_engine_error_fails_only_its_batch(client: httpx.Client) -> None:
    response = client.post("/score/batch", files=[("images", marked_png(POISON))])
    body = assert_problem(response, 500, "scoring failed for the batch")
    assert body["type"].endswith("engine-failed")
    assert client.post("/score/batch", files=[("images", marked_png(9))]).status_code == 200


def test_queue_full_answers_503_with_retry_after(servers: Servers) -> None:
    gate = threading.Event()

    class GatedScorer(EchoScorer):
        def score(self, images, include_members=False):
            gate.wait(30)
            return super().score(images, include_members)

    scorer = GatedScorer(servers.report_dir)
    server = servers.start_ready(scorer=scorer, max_batch_images=2, queue_max=2)
    scorer.batch_sizes.clear()
    with httpx.Client(base_url=server.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        waiting = [
            pool.submit(http.post, "/score/batch", files=[("images", marked_png(m))])
            for m in (1, 2)
        ]
        deadline = time.monotonic() + 10
        while "gradunc_queue_depth_images 2.0" not in http.get("/metrics/prometheus").text:
            assert time.monotonic() < deadline, "the two requests were never admitted"
            time.sleep(0.01)
        rejected = http.post("/score/batch", files=[("images", marked_png(3))])
        gate.set()
        assert [f.result().status_code for f in waiting] == [200, 200]
    body = assert_problem(rejected, 503, "queue is full", "GRADUNC_QUEUE_MAX")
    assert body["limit_value"] == 2
    assert rejected.headers["retry-after"] == "1"


def test_a_large_canvas_is_preprocessed_before_scoring(client: httpx.Client) -> None:
    canvas = np.full((90, 60), 255, dtype=np.uint8)  # dark ink on white
    canvas[20:70, 28:33] = 0
    response = client.post("/score", files={"image": ("big.png", png_bytes(canvas))})
    assert response.status_code == 200, response.text


# -- bad input: always a 4xx problem+json naming what was wrong -----------------------


def test_wrong_part_name_for_score(client: httpx.Client) -> None:
    response = client.post("/score", files={"file": ("d.png", marked_png(1))})
    assert_problem(response, 422, "needs a multipart part named 'image'", "'file'")


def test_batch_part_name_sent_to_score(client: httpx.Client) -> None:
    response = client.post("/score", files=[("images", marked_png(1)), ("images", marked_png(2))])
    assert_problem(response, 422, "part named 'image'", "POST /score/batch")


def test_two_image_parts_for_score(client: httpx.Client) -> None:
    response = client.post("/score", files=[("image", marked_png(1)), ("image", marked_png(2))])
    assert_problem(response, 422, "exactly one part named 'image', got 2")


def test_unexpected_extra_part_for_score(client: httpx.Client) -> None:
    response = client.post(
        "/score", files={"image": ("a.png", marked_png(1))}, data={"label": "seven"}
    )
    assert_problem(response, 422, "unexpected parts named 'label'")


def test_wrong_part_name_for_batch(client: httpx.Client) -> None:
    response = client.post("/score/batch", files={"image": ("d.png", marked_png(1))})
    assert_problem(response, 422, "parts named 'images'", "'image'")


def test_multipart_without_any_part(client: httpx.Client) -> None:
    response = client.post(
        "/score/batch",
        content=b"--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert_problem(response, 422, "parts found: none")


def test_unsupported_content_types(client: httpx.Client) -> None:
    assert_problem(
        client.post("/score", content=b"hello", headers={"content-type": "text/plain"}),
        415,
        "Content-Type 'text/plain' is not accepted",
        "part named 'image'",
    )
    assert_problem(
        client.post("/score", json={"image": "aGVsbG8="}),
        415,
        "'application/json'",
    )
    assert_problem(client.post("/score", content=b"x"), 415, "no Content-Type")
    assert_problem(
        client.post("/score/batch", content=marked_png(1), headers={"content-type": "image/png"}),
        415,
        "POST /score/batch takes multipart/form-data",
    )


def test_empty_body_and_empty_part(client: httpx.Client) -> None:
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
    assert_problem(
        client.post("/score/batch", files=[("images", marked_png(1)), ("images", ("x.png", b""))]),
        422,
        "part 'images' #1 ('x.png') is empty",
    )


def test_undecodable_and_truncated_images(client: httpx.Client) -> None:
    assert_problem(
        client.post("/score", files={"image": ("notes.txt", b"definitely not an image")}),
        422,
        "part 'image' ('notes.txt'): cannot decode the image: not an image",
    )
    truncated = marked_png(1)[:40]
    assert_problem(
        client.post("/score", content=truncated, headers={"content-type": "image/png"}),
        422,
        "request body (image/png): cannot decode the image",
    )
    files = [("images", marked_png(1)), ("images", ("bad.png", b"GIF89a-nope"))]
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


def test_batch_over_the_image_count_limit(client: httpx.Client) -> None:
    files = [("images", marked_png(1))] * 41
    body = assert_problem(
        client.post("/score/batch", files=files),
        413,
        "more than 40 images, the limit per request (GRADUNC_MAX_BATCH_IMAGES)",
    )
    assert body["limit_value"] == 40
    assert client.post("/score/batch", files=files[:40]).status_code == 200


def test_bad_query_parameter(client: httpx.Client) -> None:
    body = assert_problem(
        client.post(
            "/score",
            params={"include_members": "perhaps"},
            content=marked_png(1),
            headers={"content-type": "image/png"},
        ),
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


def test_api_key_protects_the_scoring_endpoints(servers: Servers) -> None:
    server = servers.start_ready(api_key="s3cret-key")
    png = {"content": marked_png(2), "headers": {"content-type": "image/png"}}
    with httpx.Client(base_url=server.url) as http:
        missing = http.post("/score", **png)
        assert_problem(missing, 401, "requires an API key", "Authorization: Bearer <key>")
        assert missing.headers["www-authenticate"] == 'Bearer realm="gradient-uncertainty"'
        wrong_key = {**png["headers"], "authorization": "Bearer x"}
        wrong = http.post("/score", content=png["content"], headers=wrong_key)
        assert_problem(wrong, 401, "API key in the Authorization header is not valid")
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = http.post(
            "/score/batch",
            files=[("images", marked_png(2))],
            headers={"authorization": "Basic czNjcmV0LWtleQ=="},
        )
        assert_problem(basic, 401, "uses the scheme 'Basic'")
        good = http.post(
            "/score",
            content=png["content"],
            headers={**png["headers"], "authorization": "Bearer s3cret-key"},
        )
        assert good.status_code == 200, good.text
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/metrics").status_code == 200


# -- reports, metrics, docs --------------------------------------------------------------


def test_metrics_serves_the_evaluation_json(client: httpx.Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    body = response.json()
    record = body["records"][0]
    assert record["score"] == "entropy" and record["auroc"] == {"mean": 0.9, "std": 0.01}
    assert record["aupr_out"]["mean"] is None  # NaN is not JSON
    assert body["known_unknowns"] == []


def test_report_page_and_its_plots(client: httpx.Client) -> None:
    page = client.get("/report")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<head><base href="/report/"><title>' in page.text
    assert '<table id="records">' in page.text
    plot = client.get("/report/plots/roc.png")
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content == marked_png(7)
    assert_problem(client.get("/report/plots/missing.png"), 404)


def test_prometheus_metrics(client: httpx.Client) -> None:
    client.post("/score", content=marked_png(2), headers={"content-type": "image/png"})
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


def test_two_apps_in_one_process_have_their_own_registries(servers: Servers) -> None:
    first, second = servers.start_ready(), servers.start_ready()
    httpx.post(first.url + "/score", content=marked_png(1), headers={"content-type": "image/png"})
    assert "gradunc_p_ood_count 1.0" in httpx.get(first.url + "/metrics/prometheus").text
    assert "gradunc_p_ood_count 0.0" in httpx.get(second.url + "/metrics/prometheus").text


def test_openapi_documents_the_contract(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    score = spec["paths"]["/score"]["post"]
    assert set(score["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert (
        "413" in score["responses"]
        and "application/problem+json" in (score["responses"]["413"]["content"])
    )
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


def test_example_client_against_the_service(servers: Servers) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "client" / "client.py"
    spec = importlib.util.spec_from_file_location("example_client", path)
    client_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client_module)
    server = servers.start_ready(api_key="example-key")
    out = io.StringIO()
    assert client_module.main(server.url, api_key="example-key", out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("POST /score (seven): prediction ")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["one", "seven", "zero", "noise"]
    with pytest.raises(client_module.ScorerError, match="401 Unauthorized: this endpoint requires"):
        client_module.main(server.url, api_key="", out=out)
