"""Metric functions: hand-computed cases and agreement with scikit-learn."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from training.evaluation.metrics import (
    UndefinedMetricWarning,
    aupr_in,
    aupr_out,
    auroc,
    fit_direction,
    fpr_at_95_tpr,
    threshold_metrics,
)

# confidence (larger = more likely correct) and correctness, four samples
CONFIDENCE = np.array([0.9, 0.8, 0.7, 0.1])
CORRECT = np.array([True, False, True, False])


def test_hand_computed_auroc():
    # pairs (positive, negative): (0.9, 0.8) (0.9, 0.1) (0.7, 0.8) (0.7, 0.1) -> 3 of 4 ordered
    assert auroc(CONFIDENCE, CORRECT) == pytest.approx(0.75)
    assert auroc([1.0, 0.0], [True, False]) == 1.0
    assert auroc([0.0, 1.0], [True, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5  # a tie counts one half


def test_hand_computed_average_precision():
    # AUPR-In ranks 0.9 (correct), 0.8 (wrong), 0.7 (correct), 0.1 (wrong):
    # precision at each correct: 1/1, 2/3 -> (1 + 2/3) / 2
    assert aupr_in(CONFIDENCE, CORRECT) == pytest.approx((1 + 2 / 3) / 2)
    # AUPR-Out ranks -0.1 (wrong), -0.7 (correct), -0.8 (wrong), -0.9: (1 + 2/3) / 2
    assert aupr_out(CONFIDENCE, CORRECT) == pytest.approx((1 + 2 / 3) / 2)
    # a perfect separation gives 1 both ways
    assert aupr_in([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert aupr_out([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0


def test_hand_computed_fpr_at_95_tpr():
    # 20 positives at 1..20, negatives at 0.5 and 2.5: keeping 19 positives (>= 2) accepts
    # the negative at 2.5 only
    confidence = np.r_[np.arange(1, 21), 0.5, 2.5]
    positive = np.r_[np.ones(20, bool), False, False]
    assert fpr_at_95_tpr(confidence, positive) == pytest.approx(0.5)
    # ties with the threshold are accepted: all negatives at the 95% positive score
    assert fpr_at_95_tpr(np.r_[np.arange(1, 21), 2, 2], positive) == pytest.approx(1.0)
    assert fpr_at_95_tpr([2, 1], [True, False]) == 0.0


@pytest.mark.parametrize("seed", range(30))
def test_agreement_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 400))
    # integer scores make many ties, the case where implementations differ
    confidence = rng.integers(0, 6, size).astype(float) if seed % 2 else rng.normal(size=size)
    positive = rng.random(size) < rng.uniform(0.05, 0.95)
    positive[:2] = [True, False]
    assert auroc(confidence, positive) == pytest.approx(roc_auc_score(positive, confidence))
    assert aupr_in(confidence, positive) == pytest.approx(
        average_precision_score(positive, confidence)
    )
    assert aupr_out(confidence, positive) == pytest.approx(
        average_precision_score(~positive, -confidence)
    )
    fpr, tpr, _ = roc_curve(positive, confidence, drop_intermediate=False)
    expected = fpr[np.searchsorted(tpr, 0.95, side="left")]
    assert fpr_at_95_tpr(confidence, positive) == pytest.approx(expected)


def test_single_class_warns_and_returns_nan():
    for metric in (auroc, aupr_in, aupr_out, fpr_at_95_tpr):
        with pytest.warns(UndefinedMetricWarning, match="undefined"):
            assert np.isnan(metric([0.1, 0.2, 0.3], [True, True, True]))
        with pytest.warns(UndefinedMetricWarning, match="no positive"):
            assert np.isnan(metric([0.1, 0.2], [0, 0]))
    with pytest.warns(UndefinedMetricWarning):
        values = threshold_metrics([0.1, 0.2], [1, 1])
    assert all(np.isnan(v) for v in values.values())


def test_fit_direction():
    entropy = np.array([0.1, 0.2, 1.5, 2.0])  # larger = less confident
    correct = np.array([True, True, False, False])
    assert fit_direction(entropy, correct) == -1
    assert fit_direction(-entropy, correct) == 1
    assert auroc(fit_direction(entropy, correct) * entropy, correct) == 1.0
    with pytest.warns(UndefinedMetricWarning, match="direction is undefined"):
        assert fit_direction(entropy, np.ones(4, bool)) == 1


def test_invalid_input_is_named():
    with pytest.raises(ValueError, match=re.escape("must have the same length, got 2 and 3")):
        auroc([0.1, 0.2], [True, False, True])
    with pytest.raises(ValueError, match=re.escape("must be boolean or 0/1, got values [0, 2]")):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=re.escape("'confidence' must be finite")):
        auroc([np.nan, 0.2], [True, False])
    with pytest.raises(ValueError, match=re.escape("'tpr' parameter must be in (0, 1], got 1.5")):
        fpr_at_95_tpr([0.1, 0.2], [True, False], tpr=1.5)
