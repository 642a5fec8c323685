"""``python -m training regraph``: a bundle's graphs exported again, its answers kept.

On a copy of the default bundle and real MNIST test digits: the re-exported bundle loads
(every hash checked), answers as before and records the new export; graphs that would
change the answers are refused and leave the bundle as it was.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from scoring.bundle import BundleError, file_sha256, load_bundle
from scoring.runtime import UncertaintyScorer
from scoring.signing import SIGNATURE_NAME, generate_key_pair, sign_bundle
from training.regraph import answer_changes, regraph_bundle

CHECK = slice(0, 32)  # the digits the regraph checks on
PROBE = slice(1000, 1256)  # other digits the tests compare answers on


def copy_of(bundle_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    return copy


def tree_hashes(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): file_sha256(p) for p in path.rglob("*") if p.is_file()}


def test_regraph_keeps_the_answers_and_writes_a_bundle_that_loads(
    bundle_dir, mnist_test, offline, tmp_path
) -> None:
    bundle = copy_of(bundle_dir, tmp_path)
    generate_key_pair(tmp_path / "key.pem", tmp_path / "key.pub")
    sign_bundle(bundle, tmp_path / "key.pem")
    before = load_bundle(bundle).manifest

    result = regraph_bundle(bundle, mnist_test.images[CHECK], log=lambda _: None)

    after = load_bundle(bundle).manifest  # every file's hash checked
    assert after.model_version == before.model_version
    assert [check["path"] for check in after.export_checks] == before.graphs
    for check in after.export_checks:
        assert check["worst"]["ratio"] <= 1.0 and check["code_revision"] and check["exported_at"]
    assert result["answers"]["largest_change"]["p_ood"] <= 1e-6
    assert result["signature_removed"] and not (bundle / SIGNATURE_NAME).exists()
    assert not list(tmp_path.glob(".bundle.*")), "staging or retired folders left behind"
    # The same answers on digits the regraph never saw.
    probe = mnist_test.images[PROBE]
    changes = answer_changes(
        offline.score(probe), UncertaintyScorer.from_bundle(bundle).score(probe)
    )
    assert max(changes["largest_change"].values()) <= 1e-6, changes
    assert changes["predictions_changed"] == changes["is_ood_changed"] == 0


def test_graphs_that_change_the_answers_are_refused_and_nothing_is_written(
    bundle_dir, mnist_test, tmp_path, monkeypatch
) -> None:
    import training.scorer_graph as scorer_graph
    from training.train import load_member

    bundle = copy_of(bundle_dir, tmp_path)
    hashes = tree_hashes(bundle)
    export = scorer_graph.export_scorer_graph
    neighbour, _ = load_member(bundle / "weights", 1)

    def export_member_1_everywhere(model, path, check_images, **options):
        # A valid graph (it passes its own reference check), of the wrong network.
        return export(neighbour, path, check_images, **options)

    monkeypatch.setattr(scorer_graph, "export_scorer_graph", export_member_1_everywhere)
    with pytest.raises(BundleError, match="change the bundle's answers") as refused:
        regraph_bundle(bundle, mnist_test.images[CHECK], log=lambda _: None)
    assert "Rebuild the bundle" in str(refused.value)
    assert tree_hashes(bundle) == hashes
    assert not list(tmp_path.glob(".bundle.*"))


def test_answer_changes_measures_every_probability_and_counts_flips(offline, mnist_test) -> None:
    answers = offline.score(mnist_test.images[:4])
    moved = [
        dataclasses.replace(answers[0], p_ood=answers[0].p_ood + 0.25),
        dataclasses.replace(answers[1], prediction=(answers[1].prediction + 1) % 10),
        dataclasses.replace(answers[2], is_ood=not answers[2].is_ood),
        dataclasses.replace(answers[3], probabilities=list(np.add(answers[3].probabilities, 1e-3))),
    ]
    changes = answer_changes(answers, moved)
    assert changes["largest_change"]["p_ood"] == pytest.approx(0.25)
    assert changes["largest_change"]["probabilities"] == pytest.approx(1e-3)
    assert changes["largest_change"]["p_correct"] == 0.0
    assert (changes["predictions_changed"], changes["is_ood_changed"]) == (1, 1)
    with pytest.raises(ValueError, match="3 old answers against 4"):
        answer_changes(answers[:3], moved)


def test_the_command_names_a_missing_bundle_before_reading_any_data(tmp_path, capsys) -> None:
    from training.cli import main

    assert main(["regraph", "--bundle-dir", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "no bundle manifest here" in capsys.readouterr().err
