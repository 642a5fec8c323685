"""The report writer and the claims rules on a hand-made report (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scoring.features import feature_names
from training.evaluation.claims import compute_claims
from training.evaluation.meta import META_CLASSIFIER_NAMES
from training.evaluation.paper_scores import BASELINE_NAMES
from training.evaluation.protocol import DEFAULT_KNOWN_UNKNOWN_SETS, EvaluationResult
from training.evaluation.report import write_report

CONCEPTS = ["notmnist", "cifar10", "uniform_noise", "normal_noise"]
COMPARISONS = ["mnist_correct_vs_wrong", *CONCEPTS]


def value(mean: float) -> dict:
    return {"mean": mean, "std": 0.01}


def record(score: str, kind: str, concept: str, auroc: float, aupr_out: float) -> dict:
    return {
        "score": score,
        "kind": kind,
        "concept": concept,
        "auroc": value(auroc),
        "aupr_in": value(0.9),
        "aupr_out": value(aupr_out),
        "fpr_at_95_tpr": value(0.2),
    }


def make_report(uniform_gain: float) -> dict:
    records = []
    for concept in COMPARISONS:
        noise = "noise" in concept
        records.append(record("entropy", "feature", concept, 0.95, 0.6))
        records.append(record("softmax_baseline", "feature", concept, 0.94, 0.6))
        for name in feature_names()[2:]:
            weak = name.split("@")[0] in ("mean", "skewness", "kurtosis")
            records.append(record(name, "feature", concept, 0.6 if weak or noise else 0.94, 0.5))
        for name in META_CLASSIFIER_NAMES:
            records.append(
                record(name, "meta_classifier", concept, 0.8 if name == "glm" else 0.95, 0.7)
            )
        for name in BASELINE_NAMES:
            records.append(record(name, "baseline", concept, 0.9, 0.5))
    known = []
    for set_name, added in DEFAULT_KNOWN_UNKNOWN_SETS:
        gain = uniform_gain if "uniform" in set_name else 0.01 if "normal" in set_name else 0.0
        for concept in COMPARISONS:
            row = record("x", "x", concept, 0.9, 0.6 + gain)
            del row["score"], row["kind"]
            known.append(
                {"model": "neural_net", "training_set": set_name, "seen": concept in added, **row}
            )
    return {
        "records": records,
        "known_unknowns": known,
        "meta_classifiers": [{"name": n} for n in META_CLASSIFIER_NAMES],
        "baselines": [{"name": n} for n in BASELINE_NAMES],
        "claims": [],
        "members": [
            {
                "member": 0,
                "seed": 0,
                "validation_images": 10,
                "test_images": 10,
                "validation_accuracy": 0.9,
                "test_accuracy": 0.9,
                "validation_wrong": 1,
                "test_wrong": 1,
            }
        ],
        "comparisons": COMPARISONS,
        "orientation": "larger = more confident",
    }


def verdicts(report: dict) -> dict[str, str]:
    return {claim["claim"]: claim["verdict"] for claim in compute_claims(report)}


def test_claims_follow_the_numbers():
    supported = verdicts(make_report(uniform_gain=0.1))
    assert len(supported) == 7
    assert set(supported.values()) == {"supported"}
    against = verdicts(make_report(uniform_gain=-0.1))
    uniform_claim = next(c for c in against if c.startswith("200 uniform-noise"))
    assert against[uniform_claim] == "not supported"
    normal_claim = next(c for c in against if c.startswith("Normal noise"))
    assert against[normal_claim] == "not supported"  # normal noise now helps more


def test_claims_show_their_numbers_and_rule():
    for claim in compute_claims(make_report(uniform_gain=0.1)):
        assert claim["rule"] and claim["numbers"]
        assert any(char.isdigit() for char in claim["numbers"])


def test_missing_numbers_are_undetermined():
    report = make_report(uniform_gain=0.1)
    for row in report["records"]:
        if row["score"] == "entropy":
            row["auroc"] = {"mean": None, "std": None}
    claims = verdicts(report)
    assert claims[
        "Gradient metrics match entropy in separating correct from wrong predictions."
    ] == ("undetermined")


def test_write_report_files(tmp_path):
    report = make_report(uniform_gain=0.1)
    report["claims"] = compute_claims(report)
    rng = np.random.default_rng(0)
    plot_data = {
        "member": 0,
        "groups": {
            "mnist correct": rng.normal(size=(50, 37)),
            "notmnist": rng.normal(size=(30, 37)),
        },
        "curves": {
            "notmnist": {"entropy": (rng.normal(size=40), np.r_[[True] * 20, [False] * 20])}
        },
    }
    result = EvaluationResult(report, plot_data)
    paths = write_report(result, tmp_path)
    assert json.loads(paths["json"].read_text()) == report
    page = paths["html"].read_text()
    for css_class in ("records", "known-unknowns", "claims", "members"):
        assert f'<table class="{css_class}">' in page
    assert "plots/violin_entropy.png" in page and "plots/curves_notmnist.png" in page
    for png in (tmp_path / "plots").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "plots").glob("violin_*.png"))) == 9
    markdown = paths["markdown"].read_text()
    assert "## Claims of the paper" in markdown and "| entropy | feature |" in markdown


def test_nan_is_not_written_as_invalid_json(tmp_path):
    report = make_report(uniform_gain=0.1)
    report["records"][0]["auroc"] = {"mean": float("nan"), "std": 0.0}
    result = EvaluationResult(report, {})
    with pytest.raises(ValueError):
        write_report(result, tmp_path)
