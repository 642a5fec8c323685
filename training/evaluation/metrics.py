"""Threshold-free metrics of meta classification (DESIGN.md section 3).

Orientation used throughout: ``positive`` marks the *correct* (or in-distribution)
samples and ``confidence`` is a score where **larger means more likely positive**.

- :func:`auroc` - area under the ROC curve of ``confidence`` for ``positive``.
- :func:`aupr_in` - average precision, correct / in-distribution positive, ``confidence``
  as the score.
- :func:`aupr_out` - average precision, incorrect / out-of-distribution positive,
  ``-confidence`` as the score.
- :func:`fpr_at_95_tpr` - the fraction of negatives (incorrect / OOD) still accepted
  when the threshold keeps 95% of the positives.
- :func:`fit_direction` - ``+1`` or ``-1``, the sign that turns a raw metric (entropy,
  a gradient norm, ...) into a confidence; fixed on validation data, then applied
  unchanged on test data.

A set with only one class leaves every metric undefined: the functions warn with
:class:`UndefinedMetricWarning` and return ``nan`` instead of raising. The values agree
with ``sklearn.metrics`` (``roc_auc_score``, ``average_precision_score``, ``roc_curve``),
ties included; the implementation is plain numpy so that it sorts each score once.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "UndefinedMetricWarning",
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr_at_95_tpr",
    "fit_direction",
    "threshold_metrics",
    "METRIC_KEYS",
    "mean_and_std",
    "aggregate_over_members",
]

#: The four numbers reported for every (score, comparison) pair, in report order.
METRIC_KEYS: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (e.g. only one class present)."""


def _validate(confidence, positive) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive)
    if positive.dtype != bool:
        values = np.unique(positive)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(
                f"The 'positive' labels must be boolean or 0/1, got values {values[:5].tolist()!r}"
            )
        positive = positive.astype(bool)
    positive = positive.reshape(-1)
    if confidence.shape != positive.shape:
        raise ValueError(
            f"'confidence' and 'positive' must have the same length, got "
            f"{confidence.shape[0]} and {positive.shape[0]}"
        )
    if not np.isfinite(confidence).all():
        raise ValueError(
            f"'confidence' must be finite, got {int((~np.isfinite(confidence)).sum())} "
            "nan or infinite values"
        )
    return confidence, positive


def _both_classes(positive: np.ndarray, metric: str) -> bool:
    count = int(positive.sum())
    if count == 0 or count == positive.size:
        kind = "no positive" if count == 0 else "no negative"
        warnings.warn(
            f"{metric} is undefined with {kind} samples ({positive.size} samples); returning nan",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return False
    return True


def _curve(confidence: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, highest first."""
    order = np.argsort(-confidence, kind="mergesort")
    sorted_scores, sorted_positive = confidence[order], positive[order]
    # last index of each run of equal scores: a threshold accepts a whole tie group
    distinct = np.flatnonzero(np.diff(sorted_scores)) if sorted_scores.size > 1 else []
    ends = np.r_[distinct, sorted_positive.size - 1].astype(np.int64)
    true_positives = np.cumsum(sorted_positive)[ends].astype(np.float64)
    false_positives = (ends + 1) - true_positives
    return true_positives, false_positives


def auroc(confidence, positive) -> float:
    """Area under the ROC curve.

    Parameters
    ----------
    confidence : array-like of shape (n_samples,)
        Score, larger means more likely positive (correct / in-distribution).
    positive : array-like of shape (n_samples,)
        Boolean or 0/1: True for correct / in-distribution samples.

    Returns
    -------
    float
        The probability that a random positive scores above a random negative (ties
        count one half); 0.5 is chance. ``nan`` with a warning when a class is missing.
    """
    confidence, positive = _validate(confidence, positive)
    if not _both_classes(positive, "AUROC"):
        return float("nan")
    true_positives, false_positives = _curve(confidence, positive)
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    return float(np.trapezoid(tpr, fpr))


def _average_precision(confidence: np.ndarray, positive: np.ndarray) -> float:
    true_positives, false_positives = _curve(confidence, positive)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(confidence, correct) -> float:
    """Average precision with correct / in-distribution samples as the positive class.

    Parameters
    ----------
    confidence : array-like of shape (n_samples,)
        Score, larger means more likely correct / in-distribution.
    correct : array-like of shape (n_samples,)
        Boolean or 0/1: True for correct / in-distribution samples (the positives).

    Returns
    -------
    float
        ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (no interpolation,
        as ``sklearn.metrics.average_precision_score``). Its chance level is the
        fraction of positives. ``nan`` with a warning when a class is missing.
    """
    confidence, correct = _validate(confidence, correct)
    if not _both_classes(correct, "AUPR-In"):
        return float("nan")
    return _average_precision(confidence, correct)


def aupr_out(confidence, correct) -> float:
    """Average precision with incorrect / out-of-distribution samples as the positive class.

    Parameters
    ----------
    confidence : array-like of shape (n_samples,)
        Score, larger means more likely correct / in-distribution; it is negated, so
        that larger means more likely incorrect / OOD.
    correct : array-like of shape (n_samples,)
        Boolean or 0/1: True for correct / in-distribution samples (the *negatives*).

    Returns
    -------
    float
        Average precision of ``-confidence`` for ``~correct``. ``nan`` with a warning
        when a class is missing.
    """
    confidence, correct = _validate(confidence, correct)
    if not _both_classes(correct, "AUPR-Out"):
        return float("nan")
    return _average_precision(-confidence, ~correct)


def fpr_at_95_tpr(confidence, positive, tpr: float = 0.95) -> float:
    """False positive rate when the threshold keeps ``tpr`` of the positives.

    The threshold is the highest score ``t`` such that at least ``tpr`` of the
    positives have ``confidence >= t``; the result is the fraction of negatives with
    ``confidence >= t`` (the first point of ``sklearn.metrics.roc_curve`` whose TPR
    reaches ``tpr``). Lower is better.

    Parameters
    ----------
    confidence : array-like of shape (n_samples,)
        Score, larger means more likely positive (correct / in-distribution).
    positive : array-like of shape (n_samples,)
        Boolean or 0/1: True for correct / in-distribution samples.
    tpr : float, default=0.95
        Fraction of positives to retain, in (0, 1].

    Returns
    -------
    float
        The false positive rate, in [0, 1]; ``nan`` with a warning when a class is
        missing.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"The 'tpr' parameter must be in (0, 1], got {tpr!r}")
    confidence, positive = _validate(confidence, positive)
    if not _both_classes(positive, "FPR at 95% TPR"):
        return float("nan")
    true_positives, false_positives = _curve(confidence, positive)
    rates = true_positives / true_positives[-1]
    index = int(np.searchsorted(rates, tpr - 1e-12, side="left"))
    return float(false_positives[index] / false_positives[-1])


def fit_direction(validation_scores, validation_correct) -> int:
    """The sign that makes a raw score a confidence, chosen on validation data.

    Parameters
    ----------
    validation_scores : array-like of shape (n_samples,)
        A raw metric on the validation split (e.g. entropy, where larger means *less*
        confident).
    validation_correct : array-like of shape (n_samples,)
        Boolean or 0/1: True for correct / in-distribution samples.

    Returns
    -------
    int
        ``+1`` when larger raw values mean more likely correct (AUROC >= 0.5), ``-1``
        otherwise. Apply it unchanged to test data: ``confidence = direction * score``.
        ``+1`` with a warning when the validation data has only one class.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # one warning, below
        value = auroc(validation_scores, validation_correct)
    if np.isnan(value):
        warnings.warn(
            "fit_direction: the direction is undefined on single-class validation data; using +1",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return 1
    return 1 if value >= 0.5 else -1


def threshold_metrics(confidence, positive) -> dict[str, float]:
    """All four metrics of :data:`METRIC_KEYS` for one confidence and one comparison."""
    return {
        "auroc": auroc(confidence, positive),
        "aupr_in": aupr_in(confidence, positive),
        "aupr_out": aupr_out(confidence, positive),
        "fpr_at_95_tpr": fpr_at_95_tpr(confidence, positive),
    }


def mean_and_std(values) -> dict[str, float | None]:
    """Mean and standard deviation (``ddof=1``; 0 for one value) of the finite values;
    both None when none is finite (a metric undefined for every member)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": None, "std": None}
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {"mean": float(finite.mean()), "std": std}


def aggregate_over_members(per_member: list[dict[str, float]]) -> dict[str, dict]:
    """:func:`mean_and_std` of every metric of :data:`METRIC_KEYS` over members."""
    return {key: mean_and_std([metrics[key] for metrics in per_member]) for key in METRIC_KEYS}
