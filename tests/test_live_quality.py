"""GET /metrics/live's figures, computed on known data: measures, undefined cases, drift.

The measures come from scikit-learn and must agree with the offline report's own
implementation (``training.evaluation.metrics``), ties included. The drift reference is
read from a temporary copy of the bundle into which the test writes
``reference/calibration_scores.json`` and re-hashes the manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from app.store.quality import (
    LabelledRows,
    live_report,
    population_stability_index,
    quality_measures,
)
from app.store.reference import REFERENCE_PATH, CalibrationReference, ReferenceCache
from scoring.bundle import load_bundle, write_manifest
from training.evaluation import metrics as offline


def test_the_measures_agree_with_the_offline_report_ties_included() -> None:
    generator = np.random.default_rng(0)
    for trial in range(20):
        size = int(generator.integers(20, 400))
        # rounded scores make many ties, as probabilities near 1 do
        confidence = np.round(generator.random(size), int(generator.integers(1, 4)))
        positive = generator.random(size) < generator.uniform(0.1, 0.9)
        if positive.all() or not positive.any():
            continue
        live = quality_measures(confidence, positive)
        assert live["auroc"] == pytest.approx(offline.auroc(confidence, positive), abs=1e-12)
        assert live["aupr_in"] == pytest.approx(offline.aupr_in(confidence, positive), abs=1e-12)
        assert live["aupr_out"] == pytest.approx(offline.aupr_out(confidence, positive), abs=1e-12)
        assert live["fpr_at_95_tpr"] == pytest.approx(
            offline.fpr_at_95_tpr(confidence, positive), abs=1e-12
        ), trial


def labelled(prediction, truth, p_correct, scores=None) -> LabelledRows:
    """Rows whose truth is a class index, or None (out of distribution)."""
    count = len(prediction)
    p_correct = np.asarray(p_correct, dtype=np.float64)
    return LabelledRows(
        prediction=np.asarray(prediction, dtype=np.int64),
        columns={
            "p_correct": p_correct,
            "p_ood": 1 - p_correct,
            "softmax_baseline": p_correct,
            "entropy": 1 - p_correct,
        },
        scores=scores or [None] * count,
        true_label=np.asarray([-1 if t is None else t for t in truth], dtype=np.int64),
        true_ood=np.asarray([t is None for t in truth], dtype=bool),
    )


def report(rows: LabelledRows, served: int = 10) -> dict:
    values = {
        name: np.linspace(0, 1, served) for name in ("p_ood", "p_correct", "softmax_baseline")
    }
    missing = CalibrationReference(unavailable="no reference in this test")
    return live_report(values, rows, missing, window_s=60.0, now=1e9, model_version="m")


def record(result: dict, comparison: str, score: str) -> dict:
    [found] = [
        r for r in result["quality"] if r["comparison"] == comparison and r["score"] == score
    ]
    return found


def test_a_comparison_without_both_classes_is_null_and_says_why() -> None:
    # four correct digits, one letter: no wrong predictions
    rows = labelled([1, 2, 3, 4, 5], [1, 2, 3, 4, None], [0.9, 0.8, 0.7, 0.95, 0.2])
    result = report(rows)
    assert result["counts"] == {
        "scored": 10,
        "labelled": 5,
        "labelled_in_distribution": 4,
        "labelled_ood": 1,
        "correct": 4,
    }
    assert result["accuracy"] == {"value": 1.0, "count": 4, "reason": None}
    undefined = record(result, "correct_vs_wrong", "p_correct")
    assert undefined["auroc"] is None and undefined["fpr_at_95_tpr"] is None
    assert (undefined["count"], undefined["positives"], undefined["negatives"]) == (4, 4, 0)
    assert "no wrong predictions on labelled in-distribution images" in undefined["reason"]
    defined = record(result, "correct_vs_ood", "p_ood")
    assert defined["reason"] is None
    assert defined["auroc"] == 1.0  # the letter has the highest p_ood
    assert (defined["count"], defined["positives"], defined["negatives"]) == (5, 4, 1)


def test_no_feedback_leaves_accuracy_and_every_measure_null() -> None:
    result = report(labelled([], [], []))
    assert result["accuracy"]["value"] is None
    assert result["accuracy"]["reason"] == "no labelled in-distribution images in the window"
    assert all(r["auroc"] is None and r["reason"] for r in result["quality"])
    assert all(r["reason"] == "no reference in this test" for r in result["drift"])


def test_entries_of_scores_are_measured_on_the_rows_that_have_them() -> None:
    scores = [{"energy": 3.0}, {"energy": 1.0}, None, {"energy": 2.0, "knn": 0.5}]
    rows = labelled([1, 2, 3, 4], [1, 9, 3, 4], [0.9, 0.2, 0.7, 0.8], scores)
    result = report(rows)
    energy = record(result, "correct_vs_rest", "scores.energy")
    assert (energy["count"], energy["positives"]) == (3, 2)
    assert energy["auroc"] == 1.0  # the wrong one has the lowest energy
    knn = record(result, "correct_vs_rest", "scores.knn")
    assert knn["count"] == 1 and knn["auroc"] is None


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shifted_one() -> None:
    generator = np.random.default_rng(1)
    reference = generator.beta(8, 2, 20_000)
    assert population_stability_index(reference, generator.beta(8, 2, 5_000)) < 0.01
    assert population_stability_index(reference, generator.beta(2, 8, 5_000)) > 1.0


def test_psi_by_hand_on_a_distribution_with_a_point_mass() -> None:
    # 60% of the reference sits at exactly 1.0: its deciles collapse to one edge there
    reference = np.r_[np.linspace(0.0, 0.5, 400), np.ones(600)]
    served = np.r_[np.full(800, 0.25), np.ones(200)]
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, 11)[1:-1]))
    reference_share = np.bincount(
        np.searchsorted(edges, reference, "right"), minlength=len(edges) + 1
    )
    served_share = np.bincount(np.searchsorted(edges, served, "right"), minlength=len(edges) + 1)
    r, s = reference_share / 1000, np.maximum(served_share / 1000, 1e-4)
    r = np.maximum(r, 1e-4)
    assert population_stability_index(reference, served) == pytest.approx(
        float(np.sum((s - r) * np.log(s / r))), rel=1e-12
    )


# -- the reference in the bundle --------------------------------------------------------


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def write_reference(bundle: Path, content: dict | str) -> None:
    """Write the reference file and re-hash the manifest, as the bundle builder does."""
    manifest = load_bundle(bundle).manifest
    path = bundle / REFERENCE_PATH
    path.parent.mkdir(exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    write_manifest(bundle, manifest)


def remove_reference(bundle: Path) -> None:
    manifest = load_bundle(bundle).manifest
    (bundle / REFERENCE_PATH).unlink(missing_ok=True)
    write_manifest(bundle, manifest)


def test_a_bundle_without_the_reference_gives_a_reason(bundle_copy: Path) -> None:
    remove_reference(bundle_copy)
    reference = CalibrationReference.load(bundle_copy)
    assert reference.values == {}
    assert f"has no {REFERENCE_PATH} in its manifest" in reference.reason("p_ood")


def test_the_reference_is_read_when_listed_and_hashed(bundle_copy: Path) -> None:
    content = {"p_ood": [0.1, 0.2], "p_correct": [0.9, 0.8, 0.7], "softmax_baseline": [1.0]}
    write_reference(bundle_copy, content)
    reference = CalibrationReference.load(bundle_copy)
    assert {name: values.tolist() for name, values in reference.values.items()} == content
    assert all(reference.reason(name) is None for name in content)


def test_a_tampered_or_incomplete_reference_is_not_used(bundle_copy: Path) -> None:
    write_reference(bundle_copy, {"p_ood": [0.1], "p_correct": "many", "softmax_baseline": []})
    reference = CalibrationReference.load(bundle_copy)
    assert list(reference.values) == ["p_ood"]
    assert "no non-empty list 'p_correct'" in reference.reason("p_correct")
    assert "no non-empty list 'softmax_baseline'" in reference.reason("softmax_baseline")
    (bundle_copy / REFERENCE_PATH).write_text(json.dumps({"p_ood": [0.5]}))  # not re-hashed
    tampered = CalibrationReference.load(bundle_copy)
    assert "SHA-256 does not match the manifest" in tampered.reason("p_ood")


def test_the_cache_rereads_the_reference_when_the_manifest_changes(bundle_copy: Path) -> None:
    cache = ReferenceCache()
    write_reference(bundle_copy, {"p_ood": [0.1], "p_correct": [0.2], "softmax_baseline": [0.3]})
    assert cache.get(bundle_copy).values["p_ood"].tolist() == [0.1]
    write_reference(bundle_copy, {"p_ood": [0.4], "p_correct": [0.2], "softmax_baseline": [0.3]})
    assert cache.get(bundle_copy).values["p_ood"].tolist() == [0.4]


def test_drift_figures_are_psi_and_scipy_ks_against_the_reference(bundle_copy: Path) -> None:
    generator = np.random.default_rng(2)
    content = {
        name: generator.beta(8, 2, 3000).tolist()
        for name in ("p_ood", "p_correct", "softmax_baseline")
    }
    write_reference(bundle_copy, content)
    served = {name: generator.beta(5, 3, 500) for name in content}
    result = live_report(
        served,
        labelled([], [], []),
        CalibrationReference.load(bundle_copy),
        window_s=60.0,
        now=1e9,
        model_version=None,
    )
    for entry in result["drift"]:
        expected = stats.ks_2samp(served[entry["score"]], content[entry["score"]])
        assert entry["ks_statistic"] == expected.statistic
        assert entry["ks_pvalue"] == expected.pvalue
        assert entry["psi"] == population_stability_index(
            np.asarray(content[entry["score"]]), served[entry["score"]]
        )
        assert (entry["count"], entry["reference_count"], entry["reason"]) == (500, 3000, None)
