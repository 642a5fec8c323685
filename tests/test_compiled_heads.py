"""The compiled heads give scikit-learn's probabilities bit for bit, on real head inputs.

The served answer uses :mod:`scoring.compiled_heads` in place of the estimators' own
``predict_proba``, so every head structure the build can write (each kind, both
calibration maps, one calibrated copy or one per fold) is fitted here on real head inputs
and its compiled form compared with it exactly; so are the committed bundle's two heads
on all 10,000 test digits. A head the module does not know keeps its estimator.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from scoring import compiled_heads
from scoring.answer import apply_heads
from scoring.compiled_heads import (
    CompiledHead,
    UnsupportedHead,
    compile_head,
    compiled_or_estimator,
)

pytest.importorskip("torch", reason="the head fitting half needs the training extra")

from training.evaluation.service_level import (  # noqa: E402
    HEAD_KINDS,
    EnsembleView,
    HeadConfig,
    ensemble_view,
    fit_calibrated,
    view_of_output,
)


@pytest.fixture(scope="module")
def digits_and_noise(offline, mnist_test):
    """Head inputs of 400 real test digits (label 1) and 200 uniform-noise images (0)."""
    noise = np.random.default_rng(1).integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    views = [
        ensemble_view(offline.engine, offline.statistics, images, batch_size=256)
        for images in (mnist_test.images[:400], noise)
    ]
    inputs = np.concatenate([view.inputs for view in views])
    return inputs, np.r_[np.ones(len(views[0])), np.zeros(len(views[1]))]


def test_the_committed_heads_are_served_compiled_and_equal_their_estimators(
    offline, offline_mnist_test_outputs, digits_and_noise
):
    compiled_correct, compiled_ood = offline.heads.compiled
    assert isinstance(compiled_correct, CompiledHead)
    assert isinstance(compiled_ood, CompiledHead)
    view = EnsembleView.concatenate(
        [view_of_output(output, offline.statistics) for output in offline_mnist_test_outputs]
    )
    inputs = np.concatenate([view.inputs, digits_and_noise[0]])
    np.testing.assert_array_equal(
        compiled_correct.predict_proba(inputs), offline.heads.p_correct.predict_proba(inputs)
    )
    np.testing.assert_array_equal(
        compiled_ood.predict_proba(inputs), offline.heads.p_ood.predict_proba(inputs)
    )
    served = apply_heads(offline.heads, inputs[:5])
    for b in range(5):  # one image at a time, as /score runs them
        alone = apply_heads(offline.heads, inputs[b : b + 1])
        assert (alone[0][0], alone[1][0]) == (served[0][b], served[1][b])


@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_every_head_the_build_can_write_compiles_to_the_same_probabilities(
    kind, method, ensemble, digits_and_noise
):
    inputs, labels = digits_and_noise
    config = HeadConfig(mlp_max_iter=100, trees_max_iter=40, calibration_ensemble=ensemble)
    columns = list(range(0, inputs.shape[1], 3))  # the head selects its columns
    head = fit_calibrated(kind, columns, inputs[::2], labels[::2], method, config)
    compiled = compile_head(head)
    held_out = inputs[1::2]
    np.testing.assert_array_equal(compiled.predict_proba(held_out), head.predict_proba(held_out))
    probes = compiled.probe_rows()
    np.testing.assert_array_equal(compiled.predict_proba(probes), head.predict_proba(probes))
    assert compiled_or_estimator(head, kind) is not head


def test_missing_values_take_the_branch_the_trees_learned(digits_and_noise):
    """Boosted trees accept NaN (the other kinds refuse it): it goes where it went in
    fitting, whichever side the comparison would have sent a number."""
    inputs, labels = digits_and_noise
    fitting = inputs[::2].copy()
    fitting[::7, 5] = np.nan  # the trees learn where NaN in column 5 goes
    head = fit_calibrated("boosted_trees", [1, 5, 9], fitting, labels[::2], "sigmoid", HeadConfig())
    held_out = inputs[1::2].copy()
    held_out[::3, [1, 5]] = np.nan
    np.testing.assert_array_equal(
        compile_head(head).predict_proba(held_out), head.predict_proba(held_out)
    )


def test_a_head_without_a_compiled_form_keeps_its_estimator(digits_and_noise, caplog):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier

    inputs, labels = digits_and_noise
    forest = CalibratedClassifierCV(RandomForestClassifier(n_estimators=5, random_state=0))
    forest.fit(inputs, labels)
    with pytest.raises(UnsupportedHead, match="RandomForestClassifier"):
        compile_head(forest)
    with caplog.at_level(logging.WARNING, logger=compiled_heads.__name__):
        assert compiled_or_estimator(forest, "p_ood") is forest
    assert "p_ood head: no compiled form" in caplog.text


def test_a_compiled_form_that_disagrees_with_its_estimator_is_not_used(
    digits_and_noise, caplog, monkeypatch
):
    """The load-time check: another scikit-learn whose arithmetic moved would make the
    compiled form differ; here it is the form of another fitted head."""
    inputs, labels = digits_and_noise
    config = HeadConfig()
    head = fit_calibrated("logistic", [0, 1, 2], inputs, labels, "sigmoid", config)
    other = fit_calibrated("logistic", [0, 1, 3], inputs, labels, "sigmoid", config)
    monkeypatch.setattr(compiled_heads, "compile_head", lambda _: compile_head(other))
    with caplog.at_level(logging.WARNING, logger=compiled_heads.__name__):
        assert compiled_or_estimator(head, "p_correct") is head
    assert "differs from scikit-learn's" in caplog.text


def test_compiled_heads_refuse_inputs_of_another_width(offline):
    compiled_correct, _ = offline.heads.compiled
    with pytest.raises(ValueError, match=r"head inputs must be \(B, \d+\)"):
        compiled_correct.predict_proba(np.zeros((2, 3)))
