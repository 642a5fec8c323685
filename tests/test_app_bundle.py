"""End to end with the committed bundle (models/default) behind a real uvicorn server.

What the service answers over HTTP must be exactly what the scorer computes offline for
the same images (no train/serve skew, DESIGN.md section 2). The bundle is conftest's
``bundle_dir``; the MNIST test set comes from the shared data directory (conftest's
``data_dir``; skipped, with the reason, where it is absent).
"""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.main import create_app
from tools.harness import LoopbackServer, encode, offline_scores, png_bytes

CHUNK = 256  # images per /score/batch request: the default GRADUNC_MAX_BATCH_IMAGES
#: MNIST test images sent over HTTP: ten full batches, four in flight. Every one of the
#: 10,000 is held against the stored answers offline (test_default_bundle_answers.py);
#: here the question is whether HTTP, decoding and batching change an answer.
SERVED = 10 * CHUNK
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def server(bundle_dir: Path):
    settings = Settings(
        bundle_dir=bundle_dir,
        max_batch_images=CHUNK,
        max_body_bytes=2_000_000,
        max_image_pixels=1_000_000,
    )
    with LoopbackServer(create_app(settings)) as running:
        running.wait_ready(timeout_s=300)
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def post_batches(http: httpx.Client, pngs: list[bytes], workers: int = 4) -> list[dict]:
    """All ``pngs`` through /score/batch in chunks (a few in flight), results in order."""

    def post(start: int) -> list[dict]:
        files = [
            ("images", (f"{start + i}.png", data, "image/png"))
            for i, data in enumerate(pngs[start : start + CHUNK])
        ]
        response = http.post("/score/batch", files=files)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    with ThreadPoolExecutor(workers) as pool:
        chunks = list(pool.map(post, range(0, len(pngs), CHUNK)))
    return [result for chunk in chunks for result in chunk]


@pytest.fixture(scope="module")
def served_mnist(http, mnist_test) -> list[dict]:
    return post_batches(http, [png_bytes(image) for image in mnist_test.images[:SERVED]])


@pytest.mark.slow
def test_mnist_test_images_served_over_http_match_the_offline_scorer(
    served_mnist, mnist_test, offline, offline_mnist_test
) -> None:
    expected = offline_mnist_test[:SERVED]
    assert len(served_mnist) == len(expected) == SERVED
    served_predictions = np.array([r["prediction"] for r in served_mnist])
    offline_predictions = np.array([r["prediction"] for r in expected])
    np.testing.assert_array_equal(served_predictions, offline_predictions)
    np.testing.assert_allclose(
        np.array([r["probabilities"] for r in served_mnist]),
        np.array([r["probabilities"] for r in expected]),
        atol=1e-5,
        rtol=0,
    )
    np.testing.assert_allclose(
        np.array([r["p_ood"] for r in served_mnist]),
        np.array([r["p_ood"] for r in expected]),
        atol=1e-5,
        rtol=0,
    )
    accuracy = (served_predictions == mnist_test.labels[:SERVED]).mean()
    assert accuracy > 0.95, accuracy
    assert {r["model_version"] for r in served_mnist} == {offline.model_version}


@pytest.mark.slow
def test_noise_and_cifar10_look_more_out_of_distribution_than_digits(
    http, served_mnist, data_dir
) -> None:
    from training.data.cifar10 import read_cifar_batch

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(256, 28, 28), dtype=np.uint8)
    rgb, _ = read_cifar_batch(data_dir / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin")
    cifar = rgb[:256]  # (256, 32, 32, 3): posted as colour PNGs, preprocessed by the service
    digits = np.mean([r["p_ood"] for r in served_mnist])
    noise_p_ood = np.mean([r["p_ood"] for r in post_batches(http, [png_bytes(x) for x in noise])])
    cifar_p_ood = np.mean([r["p_ood"] for r in post_batches(http, [png_bytes(x) for x in cifar])])
    assert noise_p_ood > digits, (noise_p_ood, digits)
    assert cifar_p_ood > digits, (cifar_p_ood, digits)


def test_a_dark_digit_on_a_large_white_canvas_keeps_its_class(
    http, served_mnist, mnist_test
) -> None:
    chosen = []
    for digit in range(10):  # the first confidently and correctly classified one of each
        for index in np.flatnonzero(mnist_test.labels[:SERVED] == digit):
            result = served_mnist[index]
            if result["prediction"] == digit and result["softmax_baseline"] > 0.99:
                chosen.append(index)
                break
    assert len(chosen) == 10
    for index in chosen:
        dark = Image.fromarray(255 - mnist_test.images[index])  # dark ink on white
        drawn = dark.resize((224, 224), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (640, 480), 255)
        canvas.paste(drawn, (300, 150))
        jpeg = encode(canvas.convert("RGB"), "JPEG", quality=92)
        response = http.post("/score", files={"image": ("canvas.jpg", jpeg)})
        assert response.status_code == 200, response.text
        assert response.json()["prediction"] == mnist_test.labels[index], index


def test_batch_order_is_kept(http, mnist_test, served_mnist) -> None:
    order = np.random.default_rng(1).permutation(SERVED)[:CHUNK]
    results = post_batches(http, [png_bytes(mnist_test.images[i]) for i in order], workers=1)
    assert [r["prediction"] for r in results] == [served_mnist[i]["prediction"] for i in order]


def test_single_image_and_members(http, mnist_test, offline) -> None:
    image = mnist_test.images[0]
    response = http.post(
        "/score",
        params={"include_members": "true"},
        content=png_bytes(image),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    [expected] = offline_scores(offline, image[None], include_members=True)
    assert result["prediction"] == expected["prediction"]
    assert len(result["members"]) == len(expected["members"])
    assert set(result["gradient_metrics"]) == set(expected["gradient_metrics"])
    np.testing.assert_allclose(result["probabilities"], expected["probabilities"], atol=1e-5)


def test_readyz_metrics_and_limits_with_the_bundle(http, offline) -> None:
    ready = http.get("/readyz").json()
    assert ready["model_version"] == offline.model_version
    assert ready["providers"] == offline.providers_in_use
    assert http.get("/metrics").json() == httpx.Response(200, json=offline.evaluation).json()
    digit = png_bytes(np.zeros((28, 28), dtype=np.uint8))
    too_many = http.post("/score/batch", files=[("images", digit)] * (CHUNK + 1))
    assert too_many.status_code == 413 and "GRADUNC_MAX_BATCH_IMAGES" in too_many.text
    huge = png_bytes(np.zeros((1001, 1000), dtype=np.uint8))
    assert http.post("/score", files={"image": huge}).status_code == 413
    big_body = http.post("/score", content=b"\0" * 2_000_001, headers={"content-type": "image/png"})
    assert big_body.status_code == 413 and "GRADUNC_MAX_BODY_BYTES" in big_body.text
    bad = http.post("/score", files={"image": ("x.png", b"not a png")})
    assert bad.status_code == 422


def test_report_page_and_plots(http) -> None:
    page = http.get("/report")
    assert page.status_code == 200 and "<table" in page.text
    for link in re.findall(r'src="(plots/[^"]+)"', page.text):
        assert http.get("/report/" + link).status_code == 200, link


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is absent (apt: chromium)")
def test_report_renders_in_headless_chromium(server, tmp_path: Path) -> None:
    common = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2000",
    ]
    url = server.url + "/report"
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table" in dom.stdout
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(
        [*common, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=180
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        assert len(np.unique(np.asarray(image.convert("L")))) > 2  # not a blank page
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_a_stopped_app_lets_go_of_its_engines(bundle_dir: Path) -> None:
    """An app embedded in a process that outlives it (a test session, a notebook) drops
    its scorer when it stops: the engines' onnxruntime arenas, about 0.5 GB, would
    otherwise stay for as long as anything still refers to the app."""
    app = create_app(Settings(bundle_dir=bundle_dir, store_enabled=False))
    with LoopbackServer(app) as running:
        running.wait_ready(timeout_s=300)
        service = app.state.service
        scorer = weakref.ref(service.scorer)
        answer = httpx.post(
            f"{running.url}/score",
            files={"image": ("7.png", png_bytes(np.zeros((28, 28), np.uint8)))},
        )
        assert answer.status_code == 200, answer.text
    gc.collect()
    assert service.scorer is None and service.batcher is None
    assert scorer() is None, "something still holds the stopped app's scorer"
