"""Bundles: a tiny real build end to end, tamper detection, and the committed default."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DEFAULT_BUNDLE

from scoring.bundle import BundleError, load_bundle
from scoring.features import feature_names
from scoring.runtime import UncertaintyScorer
from scoring.scores import SCORE_DESCRIPTIONS
from training.bundle_builder import UNKNOWN_CONCEPTS, build_bundle
from training.config import BuildConfig
from training.overrides import apply_overrides

CONCEPTS = {"mnist_correct_vs_wrong", *UNKNOWN_CONCEPTS}
SINGLE_SCORES = {"entropy", "softmax_baseline", *feature_names()}
META_SCORES = {"glm", "lasso", "ridge", "elastic_net", "neural_net"}


def tiny_config() -> BuildConfig:
    """Two members on a few thousand real images: the whole build in a couple of minutes."""
    return apply_overrides(
        BuildConfig(),
        [
            "ensemble_size=2",
            "split.train_size=2000",
            "split.validation_size=1000",
            "split.test_size=1000",
            "split.calibration_size=2000",
            "optim.max_epochs=2",
            "feature_space.fit_images=2000",
            # sets of 1,000 and 2,000 images span several Ray extraction chunks
            "evaluation.feature_batch_size=256",
            "heads.mlp_max_iter=20",
            "heads.trees_max_iter=15",
            # every head kind stays a candidate of one head (p_ood has the four shared
            # kinds, p_correct adds logistic_strong); fewer folds and input groups
            "heads.selection_folds=3",
            "heads.calibration_folds=2",
            "heads.p_correct_candidates=logistic_strong,soft_vote",
            "heads.p_correct_input_sets=all,only_softmax",
        ],
    )


@pytest.fixture(scope="module")
def tiny_bundle(data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("build") / "tiny"
    manifest = build_bundle(
        tiny_config(), data_dir, output, progress=False, log=lambda _: None, max_concept_images=300
    )
    return output, manifest


def assert_report_complete(evaluation: dict) -> None:
    """A record, with every metric as mean and std, for every score and concept."""
    found = {(r["score"], r["concept"]) for r in evaluation["records"]}
    for score in SINGLE_SCORES | META_SCORES:
        for concept in CONCEPTS:
            assert (score, concept) in found, (score, concept)
    for record in evaluation["records"]:
        for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
            assert set(record[key]) == {"mean", "std"}
    assert evaluation["claims"] and evaluation["known_unknowns"]
    service = evaluation["service_level"]
    served = {(r["score"], r["concept"]) for r in service["records"]}
    for concept in [*CONCEPTS, "notmnist_reframed", "synthesized"]:
        for score in ("p_ood", "p_correct", *SCORE_DESCRIPTIONS):
            assert (score, concept) in served, (score, concept)
    assert {"p_correct", "p_ood"} <= set(service["calibration"])


def test_tiny_build_writes_a_bundle_that_loads_and_scores(tiny_bundle, mnist_pooled):
    path, manifest = tiny_bundle
    bundle = load_bundle(path)
    assert bundle.manifest.to_dict() == json.loads(json.dumps(manifest.to_dict()))
    assert len(manifest.members) == 2 and manifest.graphs == [
        "graphs/member_0.onnx",
        "graphs/member_1.onnx",
    ]
    assert manifest.class_names == [str(digit) for digit in range(10)]
    assert manifest.config["feature_space"]["knn_k"] == BuildConfig().feature_space.knn_k
    assert {p["path"] for p in manifest.data_provenance["mnist"]} >= {
        "mnist/t10k-images-idx3-ubyte.gz"
    }
    for name in ("index.html", "report.md", "evaluation.json"):
        assert (path / "report" / name).is_file()
    assert_report_complete(bundle.evaluation())

    scorer = UncertaintyScorer.from_bundle(path)
    results = scorer.score(mnist_pooled.images[:5], include_members=True)
    assert len(results) == 5 and len(results[0].members) == 2
    assert all(0.0 <= r.p_correct <= 1.0 and 0.0 <= r.p_ood <= 1.0 for r in results)
    assert set(results[0].gradient_metrics) == {"conv1", "conv2", "conv3", "dense", "all"}
    assert set(results[0].scores) == set(SCORE_DESCRIPTIONS)
    assert results[0].label == str(results[0].prediction)


def test_a_build_on_ray_writes_the_same_bundle_as_a_local_build(
    tiny_bundle, data_dir, tmp_path, monkeypatch
):
    """The tiny build again, its two members trained and its engine passes run (in
    chunks of whole batches) as parallel tasks on a local Ray instance (same seeds, one
    torch thread each): graphs, weights, feature-space statistics and heads have the
    same SHA-256, so the model version is the same."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    # No token file written to ~/.ray for this throwaway local instance.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    local_path, local = tiny_bundle
    logged: list[str] = []
    on_ray = build_bundle(
        tiny_config(),
        data_dir,
        tmp_path / "tiny",
        progress=False,
        log=logged.append,
        max_concept_images=300,
        ray_address="local",
    )
    assert any("training members [0, 1] as Ray tasks" in line for line in logged), logged
    passes = [line for line in logged if "image sets as" in line]
    # statistics (2 members), paper-level features, ensemble views
    assert [line.split(" of ")[0] for line in passes] == [
        "member_feature_inputs",
        "member_outputs",
        "ensemble_view_job",
    ], passes
    assert all(int(line.split(" as ")[1].split()[0]) > 2 for line in passes), passes
    assert on_ray.model_version == local.model_version

    def digests(manifest) -> dict[str, str]:
        kept = ("graphs/", "weights/member_", "feature_space/", "meta/")
        return {
            f["path"]: f["sha256"]
            for f in manifest.files
            if f["path"].startswith(kept) and not f["path"].endswith(".json")
        }

    assert digests(on_ray) == digests(local) and len(digests(local)) >= 7


def test_a_changed_file_is_refused_by_name(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], copy)
    with open(copy / "meta" / "heads.joblib", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"heads\.joblib: SHA-256 .* does not match"):
        load_bundle(copy)


def test_a_manifest_without_a_key_is_refused_naming_it(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["feature_space"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="the manifest has no 'feature_space' key"):
        load_bundle(copy)


def test_bundle_files_are_world_readable(tiny_bundle):
    for path in tiny_bundle[0].rglob("*"):
        assert path.stat().st_mode & 0o004, path


def test_a_missing_file_is_refused_by_name(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], copy)
    (copy / "graphs" / "member_1.onnx").unlink()
    with pytest.raises(BundleError, match=r"member_1\.onnx: listed in the manifest but missing"):
        load_bundle(copy)


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no bundle manifest here"):
        load_bundle(tmp_path)


def test_another_feature_order_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["feature_names"] = list(reversed(manifest["feature_names"]))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="feature order differs"):
        load_bundle(copy)


@pytest.fixture(scope="module")
def default_bundle():
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        pytest.fail(f"the committed default bundle is missing from {DEFAULT_BUNDLE}")
    return load_bundle(DEFAULT_BUNDLE)


def test_committed_default_bundle_verifies_and_its_report_is_complete(default_bundle):
    manifest = default_bundle.manifest
    assert len(manifest.members) >= 5
    assert_report_complete(default_bundle.evaluation())
    for name in ("index.html", "report.md"):
        assert (default_bundle.report_dir / name).is_file()


def test_committed_default_bundle_members_reach_the_accuracy_target(default_bundle):
    accuracies = [member["test_accuracy"] for member in default_bundle.manifest.members]
    assert min(accuracies) >= 0.985, accuracies


def test_committed_default_bundle_scores_digits_and_noise(default_bundle, data_dir):
    from training.data.mnist import load_mnist

    scorer = UncertaintyScorer.from_bundle(default_bundle.path)
    digits = load_mnist(data_dir, "test")
    results = scorer.score(digits.images[:500])
    predictions = np.array([r.prediction for r in results])
    assert (predictions == digits.labels[:500]).mean() > 0.97
    noise = np.random.default_rng(123).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    noise_p_ood = np.mean([r.p_ood for r in scorer.score(noise)])
    digits_p_ood = np.mean([r.p_ood for r in results])
    assert noise_p_ood > digits_p_ood + 0.5
