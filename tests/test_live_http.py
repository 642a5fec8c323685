"""GET /metrics/live and its Prometheus gauges over real HTTP, on SQLite and PostgreSQL.

Real MNIST test digits (labelled with their true class) and uniform noise (labelled "none
of the classes") are scored by a real server with the real bundle, their feedback is
posted, and every live figure must equal what scikit-learn and SciPy compute here from
the answers the client received and the labels it sent. The drift reference is written
into a temporary copy of the bundle (the served scores of MNIST training digits, by the
offline scorer) and the manifest re-hashed.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers_store import BACKENDS, database_url
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from app.config import Settings
from app.main import create_app
from app.store.quality import population_stability_index
from app.store.reference import REFERENCE_PATH
from scoring.bundle import load_bundle, write_manifest
from tools.harness import LoopbackServer, png_bytes

DIGITS, NOISE = 60, 20
SIGNS = {"p_correct": 1.0, "p_ood": -1.0, "softmax_baseline": 1.0, "entropy": -1.0}
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def bundle_with_reference(
    bundle_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, list[float]]]:
    from scoring.runtime import UncertaintyScorer
    from training.data.mnist import load_mnist

    copy = Path(shutil.copytree(bundle_dir, tmp_path_factory.mktemp("bundle") / "bundle"))
    train = load_mnist(data_dir, "train").images[:256]
    scored = UncertaintyScorer.from_bundle(copy).score(train)
    reference = {
        # dicts, or the runtime's typed ImageScore
        name: [
            result[name] if isinstance(result, dict) else getattr(result, name) for result in scored
        ]
        for name in ("p_ood", "p_correct", "softmax_baseline")
    }
    manifest = load_bundle(copy).manifest
    (copy / REFERENCE_PATH).parent.mkdir(exist_ok=True)
    (copy / REFERENCE_PATH).write_text(json.dumps(reference))
    write_manifest(copy, manifest)
    return copy, reference


@pytest.fixture(scope="module")
def test_digits(data_dir: Path) -> Any:
    from training.data.mnist import load_mnist

    return load_mnist(data_dir, "test")


@pytest.fixture(scope="module", params=BACKENDS)
def traffic(
    request: pytest.FixtureRequest,
    bundle_with_reference: tuple[Path, dict],
    test_digits: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """A server that has scored DIGITS digits and NOISE noise images, all with feedback."""
    bundle, reference = bundle_with_reference
    url = database_url(request.param, tmp_path_factory.mktemp(request.param))
    settings = Settings(bundle_dir=bundle, database_url=url, log_level="warning")
    generator = np.random.default_rng(0)
    images = list(test_digits.images[:DIGITS]) + list(
        generator.integers(0, 256, (NOISE, 28, 28), dtype=np.uint8)
    )
    labels: list[int | None] = [int(v) for v in test_digits.labels[:DIGITS]] + [None] * NOISE
    with LoopbackServer(create_app(settings)) as server:
        server.wait_ready()
        answers = []
        for start in range(0, len(images), 20):
            files = [
                ("images", (f"{k}.png", png_bytes(image), "image/png"))
                for k, image in enumerate(images[start : start + 20])
            ]
            response = httpx.post(server.url + "/score/batch", files=files, timeout=60)
            response.raise_for_status()
            answers += response.json()["results"]
        items = [
            {"request_id": answer["request_id"], "label": label, "ood": label is None}
            for answer, label in zip(answers, labels, strict=True)
        ]
        response = httpx.post(server.url + "/feedback", json={"items": items}, timeout=60)
        assert response.json() == {"received": len(items), "matched": len(items), "unknown": []}
        live = httpx.get(server.url + "/metrics/live", timeout=60)
        assert live.status_code == 200, live.text
        yield {
            "url": server.url,
            "answers": answers,
            "labels": labels,
            "live": live.json(),
            "reference": reference,
            "backend": request.param,
        }


def expected_quality(answers: list[dict], labels: list[int | None]) -> dict[tuple, dict]:
    """Every measure, computed here from what the client saw."""
    ood = np.array([label is None for label in labels])
    truth = np.array([-1 if label is None else label for label in labels])
    correct = ~ood & (np.array([a["prediction"] for a in answers]) == truth)
    comparisons = {
        "correct_vs_wrong": ~ood,
        "correct_vs_ood": correct | ood,
        "correct_vs_rest": np.ones_like(ood),
    }
    expected = {}
    for comparison, members in comparisons.items():
        for score, sign in SIGNS.items():
            confidence = sign * np.array([a[score] for a in answers])[members]
            positive = correct[members]
            entry: dict[str, Any] = {"count": int(members.sum()), "positives": int(positive.sum())}
            if 0 < positive.sum() < positive.size:
                fpr, tpr, _ = roc_curve(positive, confidence, drop_intermediate=False)
                entry.update(
                    auroc=roc_auc_score(positive, confidence),
                    aupr_in=average_precision_score(positive, confidence),
                    aupr_out=average_precision_score(~positive, -confidence),
                    fpr_at_95_tpr=fpr[np.argmax(tpr >= 0.95)],
                )
            expected[comparison, score] = entry
    return expected


def test_live_counts_and_accuracy_match_the_traffic(traffic: dict) -> None:
    answers, labels = traffic["answers"], traffic["labels"]
    correct = sum(a["prediction"] == label for a, label in zip(answers, labels, strict=True))
    assert traffic["live"]["counts"] == {
        "scored": DIGITS + NOISE,
        "labelled": DIGITS + NOISE,
        "labelled_in_distribution": DIGITS,
        "labelled_ood": NOISE,
        "correct": correct,
    }
    assert traffic["live"]["accuracy"]["value"] == pytest.approx(correct / DIGITS, abs=1e-15)
    assert traffic["live"]["model_version"] == answers[0]["model_version"]


def test_live_measures_equal_those_computed_from_the_same_answers(traffic: dict) -> None:
    expected = expected_quality(traffic["answers"], traffic["labels"])
    live = {(r["comparison"], r["score"]): r for r in traffic["live"]["quality"]}
    assert set(expected) <= set(live)
    for key, entry in expected.items():
        record = live[key]
        assert (record["count"], record["positives"]) == (entry["count"], entry["positives"])
        for measure in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
            if measure in entry:
                assert abs(record[measure] - entry[measure]) <= TOLERANCE, (key, measure)
            else:
                assert record[measure] is None and record["reason"], key


def test_drift_is_measured_against_the_bundles_calibration_reference(traffic: dict) -> None:
    for record in traffic["live"]["drift"]:
        served = np.array([answer[record["score"]] for answer in traffic["answers"]])
        reference = np.array(traffic["reference"][record["score"]])
        test = stats.ks_2samp(served, reference)
        assert record["reason"] is None
        assert (record["count"], record["reference_count"]) == (len(served), len(reference))
        assert record["ks_statistic"] == pytest.approx(test.statistic, abs=TOLERANCE)
        assert record["psi"] == pytest.approx(
            population_stability_index(reference, served), abs=TOLERANCE
        )
    # a quarter of the traffic is noise the calibration digits never had
    p_ood = next(r for r in traffic["live"]["drift"] if r["score"] == "p_ood")
    assert p_ood["psi"] > 0.25


def test_the_prometheus_gauges_show_the_same_figures(traffic: dict) -> None:
    text = httpx.get(traffic["url"] + "/metrics/prometheus").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    live = traffic["live"]
    assert samples["gradunc_live_images", (("kind", "labelled"),)] == DIGITS + NOISE
    assert samples["gradunc_live_accuracy", ()] == live["accuracy"]["value"]
    for record in live["quality"]:
        labels = {"comparison": record["comparison"], "score": record["score"]}
        value = samples[
            "gradunc_live_quality", tuple(sorted({**labels, "measure": "auroc"}.items()))
        ]
        if record["auroc"] is None:
            assert np.isnan(value)
        else:
            assert value == record["auroc"]
    for record in live["drift"]:
        key = (("score", record["score"]), ("statistic", "psi"))
        assert samples["gradunc_live_drift", key] == record["psi"]
    assert samples["gradunc_store_up", ()] == 1.0


def test_the_window_and_the_model_version_select_the_rows(traffic: dict) -> None:
    time.sleep(0.2)
    recent = httpx.get(traffic["url"] + "/metrics/live", params={"window_s": 0.1}).json()
    assert recent["counts"]["scored"] == 0 and recent["window_s"] == 0.1
    assert all(r["reason"] == "no images scored in the window" for r in recent["drift"])
    other = httpx.get(traffic["url"] + "/metrics/live", params={"model_version": "another"})
    assert other.json()["counts"]["labelled"] == 0
    bad = httpx.get(traffic["url"] + "/metrics/live", params={"window_s": 0})
    assert bad.status_code == 422
    assert "window_s" in bad.json()["detail"]


def test_the_grafana_dashboard_reads_only_series_the_service_exposes(traffic: dict) -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "docs" / "grafana-live.json").read_text())
    text = httpx.get(traffic["url"] + "/metrics/prometheus").text
    exposed = {sample.name for f in text_string_to_metric_families(text) for sample in f.samples}
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {
        name
        for expression in expressions
        for name in re.findall(r"\b(gradunc_[a-z0-9_]+)", expression)
    }
    assert len(names) >= 10
    assert names <= exposed, sorted(names - exposed)
