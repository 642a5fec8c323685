"""Live quality: the offline report's measures, computed on labelled served traffic.

Orientation (as in the bundle's report): every score is turned into a *confidence*, larger
meaning "more likely a correct prediction on an in-distribution input" - ``p_correct``,
``-p_ood``, ``softmax_baseline``, ``-entropy`` and each entry of the score object's
``scores`` as it is (those are confidences already). A served image with feedback is

- *correct* when it is in distribution and its prediction equals the true label,
- *wrong* when it is in distribution and the prediction differs,
- *ood* when the feedback says it is none of the classes (it always counts as incorrect).

Comparisons, each with correct images as the positive class (AUPR-In) and the others as
the negative class (AUPR-Out, on the negated confidence):

- ``correct_vs_wrong`` - in-distribution images only (the offline ``mnist_correct_vs_wrong``);
- ``correct_vs_ood`` - correct images against ood ones (the offline per-concept records);
- ``correct_vs_rest`` - every labelled image, ood counting as incorrect.

A comparison without both classes has every measure null and says why. Drift compares the
served distributions of ``p_ood``, ``p_correct`` and ``softmax_baseline`` in the window
(labelled or not) with the calibration split's (:mod:`app.store.reference`): the
population stability index over the reference's deciles, and the two-sample
Kolmogorov-Smirnov statistic. All measures come from scikit-learn and SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from app.store.reference import DRIFT_SCORES, CalibrationReference
from app.store.schema import served_scores

__all__ = [
    "COMPARISONS",
    "MEASURES",
    "LabelledRows",
    "fetch_window",
    "live_report",
    "population_stability_index",
    "quality_measures",
]

COMPARISONS: tuple[str, ...] = ("correct_vs_wrong", "correct_vs_ood", "correct_vs_rest")
MEASURES: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")
#: The scores every row has, and how each becomes a confidence.
_FIXED_SCORES: dict[str, tuple[str, float]] = {
    "p_correct": ("p_correct", 1.0),
    "p_ood": ("p_ood", -1.0),
    "softmax_baseline": ("softmax_baseline", 1.0),
    "entropy": ("entropy", -1.0),
}
#: Equal-mass bins of the reference distribution used by the PSI.
PSI_BINS = 10
#: Smallest share a PSI bin is given, so that an empty bin does not make it infinite.
PSI_FLOOR = 1e-4


@dataclass(frozen=True)
class LabelledRows:
    """Served rows that have feedback, as arrays of shape (n,)."""

    prediction: np.ndarray
    columns: dict[str, np.ndarray]  # p_correct, p_ood, softmax_baseline, entropy
    scores: list[Mapping[str, Any] | None]
    true_label: np.ndarray  # -1 where ood
    true_ood: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return ~self.true_ood & (self.prediction == self.true_label)


def fetch_window(
    connection: sa.Connection, since: float, model_version: str | None
) -> tuple[dict[str, np.ndarray], LabelledRows]:
    """Served distributions (every row since ``since``) and the labelled rows among them."""
    table = served_scores
    where = [table.c.served_at >= since]
    if model_version is not None:
        where.append(table.c.model_version == model_version)
    served_rows = connection.execute(
        sa.select(*(table.c[name] for name in DRIFT_SCORES)).where(*where)
    ).all()
    served = np.asarray(served_rows, dtype=np.float64).reshape(-1, len(DRIFT_SCORES))
    labelled_rows = connection.execute(
        sa.select(
            table.c.prediction,
            *(table.c[name] for name in _FIXED_SCORES),
            table.c.true_label,
            table.c.true_ood,
            table.c.scores,
        ).where(*where, table.c.labelled_at.is_not(None))
    ).all()
    count = len(labelled_rows)
    numbers = np.asarray(
        [
            (row[0], row[1], row[2], row[3], row[4], -1 if row[5] is None else row[5])
            for row in labelled_rows
        ],
        dtype=np.float64,
    ).reshape(count, 6)
    labelled = LabelledRows(
        prediction=numbers[:, 0].astype(np.int64),
        columns={name: numbers[:, 1 + k] for k, name in enumerate(_FIXED_SCORES)},
        true_label=numbers[:, 5].astype(np.int64),
        true_ood=np.asarray([bool(row[6]) for row in labelled_rows], dtype=bool),
        scores=[row[7] for row in labelled_rows],
    )
    return {name: served[:, k] for k, name in enumerate(DRIFT_SCORES)}, labelled


def quality_measures(confidence: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR; both classes must be present.

    Parameters
    ----------
    confidence : array of shape (n,)
        Larger means more likely positive (correct).
    positive : bool array of shape (n,)
    """
    false_positive_rate, true_positive_rate, _ = roc_curve(
        positive, confidence, drop_intermediate=False
    )
    # The first ROC point that keeps 95% of the positives (as the offline report).
    at_95 = int(np.searchsorted(true_positive_rate, 0.95, side="left"))
    return {
        "auroc": float(roc_auc_score(positive, confidence)),
        "aupr_in": float(average_precision_score(positive, confidence)),
        "aupr_out": float(average_precision_score(~positive, -confidence)),
        "fpr_at_95_tpr": float(false_positive_rate[at_95]),
    }


def population_stability_index(reference: np.ndarray, served: np.ndarray) -> float:
    """PSI = sum over bins of (s - r) ln(s / r), s and r the served and reference shares.

    Bins are the reference's deciles (edges that coincide, as where many scores sit at
    exactly 1.0, are merged); shares are floored at :data:`PSI_FLOOR`. A common reading:
    below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a large one.
    """
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, PSI_BINS + 1)[1:-1]))
    bins = len(edges) + 1

    def shares(values: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins)
        return np.maximum(counts / len(values), PSI_FLOOR)

    served_share, reference_share = shares(served), shares(reference)
    return float(np.sum((served_share - reference_share) * np.log(served_share / reference_share)))


def _members(rows: LabelledRows) -> dict[str, np.ndarray]:
    """Per comparison, which labelled rows take part (bool, shape (n,))."""
    correct, ood = rows.correct, rows.true_ood
    return {
        "correct_vs_wrong": ~ood,
        "correct_vs_ood": correct | ood,
        "correct_vs_rest": np.ones_like(ood),
    }


_NEGATIVES = {
    "correct_vs_wrong": "wrong predictions on labelled in-distribution images",
    "correct_vs_ood": "images labelled out of distribution",
    "correct_vs_rest": "wrong predictions or images labelled out of distribution",
}


def _confidences(rows: LabelledRows) -> dict[str, np.ndarray]:
    """Per score, its confidence on every labelled row (shape (n,)); nan where a row does
    not have that entry of ``scores`` (older model versions, say)."""
    result = {name: sign * rows.columns[column] for name, (column, sign) in _FIXED_SCORES.items()}
    for name in sorted({key for entry in rows.scores if entry for key in entry}):
        result[f"scores.{name}"] = np.asarray(
            [
                value
                if isinstance(value := (entry or {}).get(name), int | float)
                and not isinstance(value, bool)
                else math.nan
                for entry in rows.scores
            ],
            dtype=np.float64,
        )
    return result


def _quality(rows: LabelledRows) -> list[dict[str, Any]]:
    records = []
    correct = rows.correct
    confidences = _confidences(rows)
    for comparison, members in _members(rows).items():
        for score, values in confidences.items():
            taking_part = members & np.isfinite(values)
            confidence, positive = values[taking_part], correct[taking_part]
            count, positives = int(positive.size), int(positive.sum())
            record: dict[str, Any] = {
                "comparison": comparison,
                "score": score,
                "count": count,
                "positives": positives,
                "negatives": count - positives,
                **dict.fromkeys(MEASURES),
                "reason": None,
            }
            if count == 0:
                record["reason"] = f"no labelled images for {comparison} in the window"
            elif positives == count:
                record["reason"] = (
                    f"undefined: no {_NEGATIVES[comparison]} among the {count} labelled "
                    "images, so there is nothing to tell the correct ones from"
                )
            elif positives == 0:
                record["reason"] = (
                    f"undefined: no correct predictions among the {count} labelled images "
                    "of this comparison"
                )
            else:
                record.update(quality_measures(confidence, positive))
            records.append(record)
    return records


def _drift(served: dict[str, np.ndarray], reference: CalibrationReference) -> list[dict[str, Any]]:
    records = []
    for score in DRIFT_SCORES:
        values = served[score]
        reference_values = reference.values.get(score)
        record: dict[str, Any] = {
            "score": score,
            "count": int(values.size),
            "reference_count": 0 if reference_values is None else int(reference_values.size),
            "psi": None,
            "ks_statistic": None,
            "ks_pvalue": None,
            "reason": reference.reason(score),
        }
        if record["reason"] is None and values.size == 0:
            record["reason"] = "no images scored in the window"
        if record["reason"] is None and reference_values is not None:
            test = stats.ks_2samp(values, reference_values)
            record.update(
                psi=population_stability_index(reference_values, values),
                ks_statistic=float(test.statistic),
                ks_pvalue=float(test.pvalue),
            )
        records.append(record)
    return records


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def live_report(
    served: dict[str, np.ndarray],
    rows: LabelledRows,
    reference: CalibrationReference,
    *,
    window_s: float,
    now: float,
    model_version: str | None,
) -> dict[str, Any]:
    """GET /metrics/live: counts, accuracy, quality records and drift records."""
    in_distribution = ~rows.true_ood
    labelled_in = int(in_distribution.sum())
    correct = int(rows.correct.sum())
    accuracy: dict[str, Any] = {"value": None, "count": labelled_in, "reason": None}
    if labelled_in:
        accuracy["value"] = correct / labelled_in
    else:
        accuracy["reason"] = "no labelled in-distribution images in the window"
    return {
        "window_s": window_s,
        "since": _iso(now - window_s),
        "until": _iso(now),
        "model_version": model_version,
        "counts": {
            "scored": int(served[DRIFT_SCORES[0]].size),
            "labelled": int(rows.prediction.size),
            "labelled_in_distribution": labelled_in,
            "labelled_ood": int(rows.true_ood.sum()),
            "correct": correct,
        },
        "accuracy": accuracy,
        "quality": _quality(rows),
        "drift": _drift(served, reference),
    }
