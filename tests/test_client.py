"""gradunc_client and ``gradient-uncertainty score`` against a real uvicorn server on loopback.

The server loads the real bundle; every answer the client returns is compared with the
bundle's scorer run in this process on the same file, preprocessed the same way. The
503 retries are exercised on a server whose real bundle load is held back for a moment
(so it answers "still loading" with Retry-After), and on one whose bundle is missing
(503 without Retry-After: the client must not wait).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.service import load_bundle_scorer
from gradunc_client import AsyncScoringClient, ScoringClient, ScoringError, ServiceUnavailableError
from gradunc_client._client import retry_after_seconds
from gradunc_client.cli import main as cli_main
from gradunc_client.cli import plain
from scoring.preprocessing import decode_image, prepare_image
from tools.harness import LoopbackServer

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "examples" / "images"
DIGITS = {"digit-0.png": 0, "digit-2.png": 2, "digit-7.png": 7, "digit-7-scan.jpg": 7}
API_KEY = "client-test-key-0123456789"
ATOL = 1e-5


@pytest.fixture(scope="module")
def server(bundle_dir: Path):
    with LoopbackServer(create_app(Settings(bundle_dir=bundle_dir))) as running:
        running.wait_ready()
        yield running


def offline_score(offline, data: bytes) -> dict:
    [result] = offline.score(prepare_image(decode_image(data))[None])
    return plain(result)


def assert_same(served: dict, expected: dict) -> None:
    assert served["prediction"] == expected["prediction"]
    assert served["p_ood"] == pytest.approx(expected["p_ood"], abs=ATOL)
    assert served["p_correct"] == pytest.approx(expected["p_correct"], abs=ATOL)
    assert served["is_ood"] == expected["is_ood"]
    np.testing.assert_allclose(served["probabilities"], expected["probabilities"], atol=ATOL)


def requests_counted(server: LoopbackServer, endpoint: str, status: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics/prometheus").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gradunc_http_requests_total"
        and sample.labels["endpoint"] == endpoint
        and sample.labels["status"] == status
    )


# -- the sync client -----------------------------------------------------------------------


def test_score_a_path_bytes_and_arrays(server: LoopbackServer, offline) -> None:
    data = (SAMPLES / "digit-7.png").read_bytes()
    expected = offline_score(offline, data)
    pixels = np.asarray(Image.open(SAMPLES / "digit-7.png"))  # (28, 28) uint8
    with ScoringClient(server.url) as client:
        for image in (SAMPLES / "digit-7.png", str(SAMPLES / "digit-7.png"), data, pixels):
            assert_same(client.score(image), expected)
        assert_same(client.score(pixels.astype(np.float32) / 255.0), expected)
        assert_same(client.score(np.stack([pixels] * 3, axis=-1)), expected)  # RGB
        members = client.score(data, include_members=True)["members"]
        assert len(members) == len(offline.bundle.manifest.members)


def test_score_batch_in_order_and_in_chunks(server: LoopbackServer, offline) -> None:
    names = [*DIGITS, "letter-h.png"]
    paths = [SAMPLES / name for name in names]
    before = requests_counted(server, "/score/batch", "200")
    with ScoringClient(server.url, chunk_size=2) as client:
        results = client.score_batch(paths)
    assert requests_counted(server, "/score/batch", "200") - before == 3  # 5 images, 2 a request
    assert [result["prediction"] for result in results[:4]] == list(DIGITS.values())
    letter = offline_score(offline, (SAMPLES / "letter-h.png").read_bytes())
    assert results[4]["p_ood"] == pytest.approx(letter["p_ood"], abs=1e-4)
    assert results[4]["p_ood"] > max(result["p_ood"] for result in results[:4])


def test_errors_carry_the_problem_detail(server: LoopbackServer) -> None:
    with ScoringClient(server.url) as client:
        with pytest.raises(ScoringError) as caught:
            client.score(b"this is not an image", name="notes.txt")
        assert caught.value.status == 422
        assert "notes.txt" in caught.value.detail and "cannot decode" in caught.value.detail
        assert caught.value.type.endswith("unprocessable-content")
        with pytest.raises(ValueError, match=r"shape \(H, W\).*got \(2, 3, 5, 7\)"):
            client.score(np.zeros((2, 3, 5, 7), dtype=np.uint8))
        with pytest.raises(ValueError, match=r"values in \[0, 1\]; got values from 2.0 to 2.0"):
            client.score(np.full((28, 28), 2.0))
        with pytest.raises(TypeError, match="got int"):
            client.score(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_retries must be at least 0; got -1"):
        ScoringClient(server.url, max_retries=-1)
    with pytest.raises(ValueError, match="base_url must start with http"):
        ScoringClient("127.0.0.1:8000")


def test_api_key(bundle_dir: Path) -> None:
    app = create_app(Settings(bundle_dir=bundle_dir, api_key=API_KEY))
    with LoopbackServer(app) as keyed:
        keyed.wait_ready()
        data = (SAMPLES / "digit-2.png").read_bytes()
        with ScoringClient(keyed.url, api_key=API_KEY) as client:
            assert client.score(data)["prediction"] == 2
        with ScoringClient(keyed.url) as client, pytest.raises(ScoringError) as caught:
            client.score(data)
        assert caught.value.status == 401 and "requires an API key" in caught.value.detail


# -- 503: retried when the service says when, raised when it does not ------------------------


def test_retries_while_the_bundle_loads(bundle_dir: Path) -> None:
    def held_back_loader(settings: Settings):
        time.sleep(1.5)  # the real bundle, loaded a little later
        return load_bundle_scorer(settings)

    app = create_app(Settings(bundle_dir=bundle_dir), scorer_loader=held_back_loader)
    with LoopbackServer(app) as loading:
        data = (SAMPLES / "digit-0.png").read_bytes()
        with (
            ScoringClient(loading.url, max_retries=0) as impatient,
            pytest.raises(ServiceUnavailableError, match="still loading"),
        ):
            impatient.score(data)
        with ScoringClient(loading.url, max_retries=20, max_retry_wait_s=0.5) as client:
            assert client.score(data)["prediction"] == 0
        assert requests_counted(loading, "/score", "503") >= 2
        assert requests_counted(loading, "/score", "200") == 1


def test_async_client_retries_while_the_bundle_loads(bundle_dir: Path, offline) -> None:
    def held_back_loader(settings: Settings):
        time.sleep(1.0)
        return load_bundle_scorer(settings)

    app = create_app(Settings(bundle_dir=bundle_dir), scorer_loader=held_back_loader)
    paths = [SAMPLES / name for name in DIGITS]

    async def run(url: str) -> tuple[list[dict], list[dict]]:
        async with AsyncScoringClient(url, max_retries=20, max_retry_wait_s=0.5) as client:
            singles = await asyncio.gather(*(client.score(path) for path in paths))
            batch = await client.score_batch(paths)
            return list(singles), batch

    with LoopbackServer(app) as loading:
        singles, batch = asyncio.run(run(loading.url))
    assert [result["prediction"] for result in singles] == list(DIGITS.values())
    assert [result["prediction"] for result in batch] == list(DIGITS.values())
    assert_same(singles[2], offline_score(offline, paths[2].read_bytes()))


def test_a_failed_bundle_is_not_retried(tmp_path: Path) -> None:
    app = create_app(Settings(bundle_dir=tmp_path / "no-bundle"))
    with LoopbackServer(app) as broken:
        broken.wait_settled()
        started = time.monotonic()
        with ScoringClient(broken.url, max_retries=5) as client:
            with pytest.raises(ServiceUnavailableError, match="failed to load") as caught:
                client.score((SAMPLES / "digit-0.png").read_bytes())
            with pytest.raises(ServiceUnavailableError, match="failed to load"):
                client.wait_until_ready(timeout_s=30)
        assert time.monotonic() - started < 20  # raised at once, not after backing off
        assert caught.value.status == 503 and "no-bundle" in caught.value.detail
        assert requests_counted(broken, "/score", "503") == 1


class FailingProxy:
    """The real app behind a stand-in for a proxy whose upstream died (Ray Serve's, say):
    the first ``failures`` POST /score get the proxy's own plain-text 500, or the same
    status as problem+json when ``as_problem`` (then it reads as the service's own)."""

    def __init__(self, app, failures: int, as_problem: bool = False) -> None:
        self.app, self.failures, self.as_problem, self.seen = app, failures, as_problem, 0

    async def __call__(self, scope, receive, send) -> None:
        from starlette.responses import JSONResponse, PlainTextResponse

        if scope["type"] == "http" and scope["path"] == "/score":
            self.seen += 1
            if self.failures > 0:
                self.failures -= 1
                if self.as_problem:
                    body = {"title": "Internal Server Error", "status": 500, "detail": "boom"}
                    answer = JSONResponse(body, 500, media_type="application/problem+json")
                else:
                    answer = PlainTextResponse("Internal Server Error", 500)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def test_a_proxys_own_500_is_retried_and_the_services_is_not(bundle_dir: Path, offline) -> None:
    data = (SAMPLES / "digit-7.png").read_bytes()
    proxy = FailingProxy(create_app(Settings(bundle_dir=bundle_dir)), failures=2)
    with LoopbackServer(proxy) as running:
        running.wait_ready()
        with ScoringClient(running.url, max_retries=5) as client:
            assert_same(client.score(data), offline_score(offline, data))
    assert proxy.seen == 3  # two plain 500s, then the answer

    proxy = FailingProxy(create_app(Settings(bundle_dir=bundle_dir)), failures=1, as_problem=True)
    with LoopbackServer(proxy) as running:
        running.wait_ready()
        client = ScoringClient(running.url, max_retries=5)
        with client, pytest.raises(ScoringError, match="boom") as caught:
            client.score(data)
    assert caught.value.status == 500 and proxy.seen == 1


def test_retry_after_as_seconds_and_as_a_date() -> None:
    def answer(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after_seconds(answer("3")) == 3.0
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 20 < retry_after_seconds(answer(format_datetime(later, usegmt=True))) <= 30
    assert retry_after_seconds(answer("soon")) is None
    assert retry_after_seconds(httpx.Response(503)) is None


# -- feedback --------------------------------------------------------------------------------


def test_feedback_for_scored_images(server: LoopbackServer) -> None:
    paths = {route.path for route in server.server.config.app.routes if hasattr(route, "path")}
    spec = httpx.get(server.url + "/openapi.json").json()
    if "/feedback" not in spec["paths"] and "/feedback" not in paths:
        pytest.skip("this build has no POST /feedback yet")
    with ScoringClient(server.url) as client:
        seven, letter = client.score_batch([SAMPLES / "digit-7.png", SAMPLES / "letter-h.png"])
        answer = client.feedback(
            [
                {"request_id": seven["request_id"], "label": 7, "ood": False},
                {"request_id": letter["request_id"], "label": None, "ood": True},
                {"request_id": "no-such-request", "label": 1, "ood": False},
            ]
        )
        assert "no-such-request" in json.dumps(answer)
        with pytest.raises(ValueError, match="lacks label, ood"):
            client.feedback([{"request_id": seven["request_id"]}])


# -- gradient-uncertainty score ------------------------------------------------------------


def run_cli(*arguments: str) -> tuple[int, str]:
    out = io.StringIO()
    previous = sys.stdout
    sys.stdout = out
    try:
        code = cli_main(["score", "--no-progress", *arguments])
    finally:
        sys.stdout = previous
    return code, out.getvalue()


def test_score_command_in_process_writes_json_lines(bundle_dir: Path, offline) -> None:
    code, text = run_cli("--bundle-dir", str(bundle_dir), str(SAMPLES))
    assert code == 0
    records = [json.loads(line) for line in text.splitlines()]
    by_name = {Path(record["path"]).name: record for record in records}
    assert set(by_name) == {*DIGITS, "letter-h.png"}
    for name, digit in DIGITS.items():
        assert by_name[name]["prediction"] == digit
    assert [record["path"] for record in records] == sorted(record["path"] for record in records)
    assert by_name["letter-h.png"]["p_ood"] > by_name["digit-7.png"]["p_ood"]


def test_score_command_against_the_server_writes_csv(
    server: LoopbackServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "scores.csv"
    code, _ = run_cli(
        "--url",
        server.url,
        "--format",
        "csv",
        "--output",
        str(output),
        "--batch-size",
        "2",
        str(SAMPLES / "digit-2.png"),
        str(broken),
        str(SAMPLES / "digit-0.png"),
    )
    assert code == 1  # one image could not be scored; the others were
    rows = list(csv.DictReader(io.StringIO(output.read_text())))
    assert [Path(row["path"]).name for row in rows] == ["digit-2.png", "broken.png", "digit-0.png"]
    assert rows[0]["prediction"] == "2" and rows[2]["prediction"] == "0"
    assert rows[0]["error"] == "" and rows[0]["is_ood"] == "False"
    assert rows[1]["prediction"] == "" and "422" in rows[1]["error"]
    assert float(rows[0]["p_ood"]) >= 0 and rows[0]["model_version"]


def test_score_command_refuses_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        run_cli(str(tmp_path / "nothing-here"))
    assert caught.value.code == 2


def test_example_client_runs_against_the_server(server: LoopbackServer) -> None:
    environment = {**os.environ, "SCORER_URL": server.url, "PYTHONPATH": str(REPO_ROOT)}
    environment.pop("GRADUNC_API_KEY", None)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "client" / "client.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("POST /score (seven): prediction ")
    assert len(lines) == 5 and lines[-1].startswith(" noise: ")
