"""The evaluation protocol end to end on small real data: two briefly trained members.

Real MNIST, notMNIST, Omniglot, CIFAR-10 and generated noise; real CNNs (~200 SGD
steps each), exported to scorer graphs and scored by the shared engine, exactly the
path the bundle builder takes. A refused export (the graph disagrees with the torch
reference) fails the tests: there is no fallback. Skipped when the data sets are absent.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from helpers_models import train_briefly

from scoring.features import feature_names
from training.evaluation.baselines import BaselineConfig
from training.evaluation.concepts import CORRECT_VS_WRONG, split_known_unknowns
from training.evaluation.feature_cache import (
    EngineFeatureExtractor,
    FeatureCache,
    ReferenceFeatureExtractor,
)
from training.evaluation.meta import META_CLASSIFIER_NAMES
from training.evaluation.paper_scores import BASELINE_NAMES
from training.evaluation.protocol import EvaluationConfig, MemberInput, run_evaluation
from training.model import PaperCNN

pytestmark = pytest.mark.slow

CONCEPTS = {  # concept -> (source, count, seed)
    "notmnist": ("notmnist", 300, 0),
    "omniglot_latin": ("omniglot-latin", 200, 0),
    "cifar10": ("cifar10", 400, 0),
    "omniglot_other": ("omniglot-other", 300, 0),
    "uniform_noise": ("uniform-noise", 200, 0),
    "normal_noise": ("normal-noise", 200, 0),
    "uniform_noise_train": ("uniform-noise", 60, 1),
    "normal_noise_train": ("normal-noise", 60, 1),
}

SMALL_CONFIG = EvaluationConfig(
    baselines=BaselineConfig(mc_dropout_passes=4, batch_size=1024),
    known_unknown_train_counts=(
        ("uniform_noise", 60),
        ("normal_noise", 60),
        ("cifar10", 100),
        ("omniglot_other", 80),
    ),
)


def train_small_member(images: np.ndarray, labels: np.ndarray, seed: int) -> PaperCNN:
    """~200 SGD steps on a few thousand real digits: accurate enough to make mistakes."""
    return train_briefly(images, labels, steps=200, learning_rate=0.02, seed=seed)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, mnist_pooled, data_dir):
    # One torch thread: on a shared 2-core machine two threads fighting another
    # process's threads run ~8x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _evaluate_small_ensemble(tmp_path_factory, mnist_pooled, data_dir)
    finally:
        torch.set_num_threads(threads)


def _evaluate_small_ensemble(tmp_path_factory, mnist_pooled, data_dir):
    from training.data.sources import load_source
    from training.scorer_graph import ScorerExportError, export_scorer_graph

    root = tmp_path_factory.mktemp("evaluation")
    members = []
    for k in range(2):
        order = np.random.default_rng(100 + k).permutation(len(mnist_pooled))[:5_000]
        images, labels = mnist_pooled.images[order], mnist_pooled.labels[order]
        model = train_small_member(images[1_200:], labels[1_200:], seed=k)
        graph = root / "graphs" / f"member_{k}.onnx"
        try:
            export_scorer_graph(model, graph, images[:32])
        except ScorerExportError as error:  # the engine path is under test: no fallback
            pytest.fail(f"the scorer graph export refused member {k}: {error}")
        members.append(
            MemberInput(
                model=model,
                graph_paths=[graph],
                validation_images=images[:600],
                validation_labels=labels[:600],
                test_images=images[600:1_200],
                test_labels=labels[600:1_200],
                seed=k,
            )
        )
    sources = {
        name: load_source(source, data_dir, seed=seed, count=count).images
        for name, (source, count, seed) in CONCEPTS.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence of tiny fits is not under test
        result = run_evaluation(
            members,
            sources,
            root / "report",
            root / "cache",
            SMALL_CONFIG,
            progress=False,
            feature_extractor=None,  # the engine on the exported graphs
        )
    return {"result": result, "root": root, "members": members, "sources": sources}


def test_a_record_for_every_score_and_concept(evaluation):
    report = json.loads((evaluation["root"] / "report" / "evaluation.json").read_text())
    comparisons = [CORRECT_VS_WRONG, *[c for c in CONCEPTS if not c.endswith("_train")]]
    assert report["comparisons"] == comparisons
    scores = [*feature_names(), *META_CLASSIFIER_NAMES, *BASELINE_NAMES]
    found = {(r["score"], r["concept"]) for r in report["records"]}
    assert found == {(s, c) for s in scores for c in comparisons}
    for record in report["records"]:
        assert set(record) >= {"score", "concept", "auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"}
        for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
            assert set(record[key]) == {"mean", "std"}
    entropy = {r["concept"]: r for r in report["records"] if r["score"] == "entropy"}
    # a real CNN separates its right from its wrong answers, and digits from noise
    assert entropy[CORRECT_VS_WRONG]["auroc"]["mean"] > 0.75
    assert entropy["uniform_noise"]["auroc"]["mean"] > 0.6
    for key in ("known_unknowns", "meta_classifiers", "baselines", "claims", "members"):
        assert report[key], key


def test_known_unknowns_mark_seen_concepts(evaluation):
    rows = evaluation["result"].report["known_unknowns"]
    seen = {(r["training_set"], r["concept"]) for r in rows if r["seen"]}
    assert ("validation+uniform_noise", "uniform_noise") in seen
    assert ("validation+uniform_noise+cifar10", "cifar10") in seen
    assert ("validation+uniform_noise+cifar10+omniglot", "omniglot_other") in seen
    assert ("validation", "uniform_noise") not in seen
    assert not any(concept == "notmnist" for _, concept in seen)


def test_training_parts_are_disjoint_from_evaluation_images(evaluation):
    evaluated, training = split_known_unknowns(evaluation["sources"], SMALL_CONFIG)
    assert len(training["cifar10"]) == 100 and len(evaluated["cifar10"]) == 300
    assert len(training["uniform_noise"]) == 60 and len(evaluated["uniform_noise"]) == 200
    for concept, part in training.items():
        held_out = {image.tobytes() for image in evaluated[concept]}
        assert not any(image.tobytes() in held_out for image in part), concept


def test_report_files(evaluation):
    report_dir = evaluation["root"] / "report"
    page = (report_dir / "index.html").read_text()
    for css_class in ("records", "known-unknowns", "claims", "members"):
        assert f'<table class="{css_class}">' in page
    assert "<script" not in page and "http" not in page
    images = re.findall(r'src="(plots/[^"]+)"', page)
    assert any("violin_entropy" in image for image in images)
    assert any("curves_mnist_correct_vs_wrong" in image for image in images)
    for image in images:
        assert (report_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (report_dir / "report.md").read_text()
    assert "| entropy | feature |" in markdown
    claims = evaluation["result"].report["claims"]
    assert len(claims) >= 6
    assert {c["verdict"] for c in claims} <= {"supported", "not supported", "undetermined"}


def test_feature_cache_is_reused(evaluation):
    cache_dir = evaluation["root"] / "cache"
    files = sorted(cache_dir.glob("features_*.npz"))
    assert files
    before = {path: path.stat().st_mtime_ns for path in files}
    paths = [path for member in evaluation["members"] for path in member.graph_paths]
    extractor = EngineFeatureExtractor(paths)
    cache = FeatureCache(cache_dir, extractor, log=lambda message: None)
    member = evaluation["members"][0]
    again = cache.get("validation", member.validation_images)
    assert again.features.shape == (2, 600, 37)
    assert {path: path.stat().st_mtime_ns for path in files} == before
    assert sorted(cache_dir.glob("features_*.npz")) == files


def test_reference_extractor_gives_the_same_features(evaluation):
    """The torch reference and the engine agree (loosely: float32 gradients of tiny values)."""
    member = evaluation["members"][0]
    images = member.test_images[:64]
    paths = [path for m in evaluation["members"] for path in m.graph_paths]
    engine_probabilities, engine_features = EngineFeatureExtractor(paths)(images)
    reference = ReferenceFeatureExtractor([m.model for m in evaluation["members"]])
    reference_probabilities, reference_features = reference(images)
    np.testing.assert_allclose(engine_probabilities, reference_probabilities, atol=1e-5)
    norms = [feature_names().index(f"euclidean_norm@{layer}") for layer in ("dense", "all")]
    np.testing.assert_allclose(
        engine_features[..., norms], reference_features[..., norms], rtol=0.05, atol=1e-6
    )
