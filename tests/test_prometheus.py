"""GET /metrics/prometheus against a real uvicorn server on loopback with the real bundle.

Every route is counted under its template (/docs, /openapi.json and the report's plots
too; only paths no route serves are ``unmatched``), no ``*_created`` series is exported,
the loaded model is an info metric, answers are counted by ``is_ood``, and the p_ood
histogram has bounds at and around the bundle's threshold.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.main import create_app
from app.metrics import p_ood_buckets
from tools.harness import LoopbackServer

SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def server(bundle_dir: Path):
    with LoopbackServer(create_app(Settings(bundle_dir=bundle_dir))) as running:
        running.wait_ready()
        yield running


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def requests_by_endpoint(text: str) -> dict[tuple[str, str, str], float]:
    return {
        (labels["endpoint"], labels["method"], labels["status"]): value
        for name, labels, value in samples(text)
        if name == "gradunc_http_requests_total"
    }


def test_every_route_is_counted_under_its_template(server: LoopbackServer) -> None:
    plot = next(
        (Path(server.server.config.app.state.service.scorer.report_dir) / "plots").glob("*.png")
    )
    probes = {
        "/docs": 200,
        "/openapi.json": 200,
        "/docs/assets/swagger-ui.css": 200,
        f"/report/plots/{plot.name}": 200,
        "/report/plots/no-such-plot.png": 404,
        "/healthz": 200,
        "/": 307,
    }
    for path, status in probes.items():
        assert httpx.get(server.url + path).status_code == status, path
    assert httpx.delete(server.url + "/healthz").status_code == 405
    assert httpx.get(server.url + "/no/such/route").status_code == 404
    counted = requests_by_endpoint(httpx.get(server.url + "/metrics/prometheus").text)
    for endpoint, status in [
        ("/docs", "200"),
        ("/openapi.json", "200"),
        ("/docs/assets/{path}", "200"),
        ("/report/plots/{path}", "200"),
        ("/report/plots/{path}", "404"),
        ("/healthz", "200"),
        ("/", "307"),
    ]:
        assert counted.get((endpoint, "GET", status), 0) >= 1, (endpoint, status, counted)
    assert counted.get(("/healthz", "DELETE", "405"), 0) >= 1, counted
    unmatched = {key for key in counted if key[0] == "unmatched"}
    assert unmatched == {("unmatched", "GET", "404")}, unmatched


def test_no_created_series(server: LoopbackServer) -> None:
    text = httpx.get(server.url + "/metrics/prometheus").text
    assert "_created" not in text


def test_model_version_info_and_threshold(server: LoopbackServer) -> None:
    scorer = server.server.config.app.state.service.scorer
    text = httpx.get(server.url + "/metrics/prometheus").text
    found = samples(text)
    assert ("gradunc_model_info", {"model_version": scorer.model_version}, 1.0) in found
    [threshold] = [value for name, _, value in found if name == "gradunc_ood_threshold"]
    assert threshold == pytest.approx(scorer.ood_threshold)


def test_answers_are_counted_by_is_ood_and_p_ood_buckets_resolve_the_threshold(
    server: LoopbackServer,
) -> None:
    def answers() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics/prometheus").text
        return {
            labels["is_ood"]: value
            for name, labels, value in samples(text)
            if name == "gradunc_answers_total"
        }

    before = answers()
    files = [
        ("images", (name, (SAMPLES / name).read_bytes()))
        for name in ("digit-7.png", "digit-2.png", "letter-h.png")
    ]
    results = httpx.post(server.url + "/score/batch", files=files, timeout=60).json()["results"]
    single = httpx.post(
        server.url + "/score",
        content=(SAMPLES / "digit-0.png").read_bytes(),
        headers={"content-type": "image/png"},
        timeout=60,
    ).json()
    served = [*results, single]
    after = answers()
    flagged = sum(result["is_ood"] for result in served)
    assert after["true"] - before.get("true", 0) == flagged
    assert after["false"] - before.get("false", 0) == len(served) - flagged

    threshold = server.server.config.app.state.service.scorer.ood_threshold
    text = httpx.get(server.url + "/metrics/prometheus").text
    bounds = sorted(
        float(labels["le"])
        for name, labels, _ in samples(text)
        if name == "gradunc_p_ood_bucket" and labels["le"] != "+Inf"
    )
    assert any(math.isclose(bound, threshold, abs_tol=1e-6) for bound in bounds)
    near = [bound for bound in bounds if abs(bound - threshold) <= 0.05 + 1e-9]
    assert len(near) >= 5, (threshold, bounds)
    # Every answer at or above the threshold lies above the bucket that ends just below it.
    below = max(bound for bound in bounds if bound < threshold - 1e-9)
    counts = {
        float(labels["le"]) if labels["le"] != "+Inf" else math.inf: value
        for name, labels, value in samples(text)
        if name == "gradunc_p_ood_bucket"
    }
    total = counts[math.inf]
    assert total - counts[below] >= flagged


def test_p_ood_buckets_around_a_threshold() -> None:
    bounds = p_ood_buckets(0.3)
    assert {0.25, 0.28, 0.29, 0.3, 0.31, 0.32, 0.35} <= set(bounds)
    assert bounds == tuple(sorted(bounds)) and bounds[-1] == 1.0
    assert p_ood_buckets(float("nan")) == p_ood_buckets(None)  # no bundle threshold yet
    assert all(0 < bound <= 1 for bound in p_ood_buckets(0.005))


def test_the_exposition_parses_and_names_only_gradunc_and_process_metrics(
    server: LoopbackServer,
) -> None:
    text = httpx.get(server.url + "/metrics/prometheus").text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert all(re.match(r"(gradunc|process)_", name) for name in names), names
