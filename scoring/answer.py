"""The served answer, formed in one place from engine outputs (DESIGN.md section 2).

The service (:mod:`scoring.runtime`) and the pipeline (its head fitting, threshold choice
and evaluation) both call :func:`head_inputs` and :func:`form_answer`, so the report
measures exactly what is served.

Head inputs (one row per image, names from :func:`head_input_names`):

- every member feature (entropy, softmax baseline, gradient metrics), entropy and the
  gradients' norms, minima and maxima on a log scale (:mod:`scoring.meta_inputs`), then
  their **mean** and **spread** (standard deviation) over members;
- every feature-space score (:mod:`scoring.scores`), mean and spread over members, the
  two Mahalanobis distances on a log scale;
- the ensemble scores: predictive entropy and mutual information on a log scale,
  disagreement, and the ensemble's max softmax as ``log(1 - p)``.

Orientation: both heads are classifiers whose ``predict_proba(X)[:, 1]`` is the
probability of the *confident* class: "correct" for the p_correct head, "in-distribution"
for the p_ood head. So ``p_correct = proba[:, 1]`` and ``p_ood = 1 - proba[:, 1]``, here
and nowhere else. ``is_ood = p_ood >= ood_threshold``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring.compiled_heads import compiled_or_estimator
from scoring.engine import EngineOutput
from scoring.features import feature_names
from scoring.meta_inputs import log_magnitude, magnitude_columns, plain_columns
from scoring.scores import (
    DISTANCE_SCORE_NAMES,
    FEATURE_SPACE_SCORE_NAMES,
    FeatureSpaceStatistics,
    disagreement,
    ensemble_scores,
    member_scores,
    mutual_information,
    predictive_entropy,
)

__all__ = [
    "HEAD_INPUT_GROUPS",
    "EnsembleAnswer",
    "Heads",
    "apply_heads",
    "feature_space_of",
    "form_answer",
    "head_input_names",
    "head_inputs",
]


def _member_columns() -> tuple[list[int], list[int]]:
    return magnitude_columns(), plain_columns()


def head_input_names() -> list[str]:
    """Names of the head-input columns, in order."""
    names = feature_names()
    magnitude, plain = _member_columns()
    member = [names[i] for i in magnitude] + [names[i] for i in plain]
    member += list(FEATURE_SPACE_SCORE_NAMES)
    columns = [f"{name}:mean" for name in member] + [f"{name}:spread" for name in member]
    return columns + [
        "predictive_entropy",
        "mutual_information",
        "disagreement",
        "ensemble_softmax_baseline",
    ]


def _group_of(name: str) -> str:
    base = name.split(":")[0]
    if base in FEATURE_SPACE_SCORE_NAMES:
        return "feature_space"
    if "@" in base:
        return "gradient"
    if name.endswith(":spread") or base in (
        "predictive_entropy",
        "mutual_information",
        "disagreement",
    ):
        return "ensemble"
    return "softmax"


#: Which group each head input belongs to (the report's ablations drop one group at a time).
#: Spread over members is an ensemble signal, whatever the feature: it counts as
#: "ensemble" except for gradient and feature-space columns, which stay in their group.
HEAD_INPUT_GROUPS: dict[str, str] = {name: _group_of(name) for name in head_input_names()}


def head_inputs(output: EngineOutput, feature_space: dict[str, np.ndarray]) -> np.ndarray:
    """Head inputs ``(B, len(head_input_names()))`` float64 from all members' outputs.

    ``feature_space``: the members' feature-space confidences ``(M, B)`` by name.
    """
    features = output.features().astype(np.float64)  # (M, B, 37)
    magnitude, plain = _member_columns()
    member = np.concatenate(
        [log_magnitude(features[..., magnitude]), features[..., plain]], axis=2
    )  # (M, B, F)
    space = np.stack(
        [
            np.log1p(-feature_space[name]) if name in DISTANCE_SCORE_NAMES else feature_space[name]
            for name in FEATURE_SPACE_SCORE_NAMES
        ],
        axis=2,
    )  # (M, B, 6)
    member = np.concatenate([member, space], axis=2)
    probabilities = output.probabilities.astype(np.float64)  # (M, B, 10)
    ensemble = np.stack(
        [
            log_magnitude(predictive_entropy(probabilities)),
            log_magnitude(mutual_information(probabilities)),
            disagreement(probabilities),
            np.log(np.clip(1.0 - probabilities.mean(axis=0).max(axis=1), 1e-12, 1.0)),
        ],
        axis=1,
    )  # (B, 4)
    return np.concatenate([member.mean(axis=0), member.std(axis=0), ensemble], axis=1)


@dataclass(frozen=True)
class Heads:
    """The two fitted service heads and the threshold, as stored in the bundle.

    ``compiled``: the heads' numpy forms (:mod:`scoring.compiled_heads`), which give the
    estimators' probabilities bit for bit without scikit-learn's per-call overhead (3.7
    of a one-image request's milliseconds); :func:`apply_heads` uses them where present.
    """

    p_correct: Any  # classifier; predict_proba(X)[:, 1] = P(correct)
    p_ood: Any  # classifier; predict_proba(X)[:, 1] = P(in-distribution)
    ood_threshold: float
    input_names: Sequence[str]
    compiled: tuple[Any, Any] | None = None  # (p_correct, p_ood), each with predict_proba

    def with_compiled_forms(self) -> Heads:
        """These heads with their compiled forms, each checked against its estimator on
        probe rows; a head without a faithful compiled form keeps its estimator."""
        return dataclasses.replace(
            self,
            compiled=(
                compiled_or_estimator(self.p_correct, "p_correct"),
                compiled_or_estimator(self.p_ood, "p_ood"),
            ),
        )

    def check(self) -> None:
        """Refuse heads fitted on another input layout than this code computes."""
        if list(self.input_names) != head_input_names():
            raise ValueError(
                "the heads were fitted on other head inputs than this code computes; "
                "rebuild the bundle with this version"
            )


@dataclass(frozen=True)
class EnsembleAnswer:
    """The ensemble's answer for ``B`` images (arrays over the batch)."""

    probabilities: np.ndarray  # (B, 10), members' mean softmax
    prediction: np.ndarray  # (B,) int
    entropy: np.ndarray  # (B,), of the mean softmax
    softmax_baseline: np.ndarray  # (B,)
    gradient_metrics: np.ndarray  # (B, L, S), mean over members
    scores: dict[str, np.ndarray]  # name -> (B,), each a confidence
    p_correct: np.ndarray  # (B,)
    p_ood: np.ndarray  # (B,)
    is_ood: np.ndarray  # (B,) bool
    member_scores: dict[str, np.ndarray]  # feature-space name -> (M, B)


def feature_space_of(
    output: EngineOutput, statistics: Sequence[FeatureSpaceStatistics]
) -> dict[str, np.ndarray]:
    """The members' feature-space confidences ``(M, B)`` by name."""
    if len(statistics) != output.num_members:
        raise ValueError(
            f"{len(statistics)} feature-space statistics for {output.num_members} members"
        )
    return member_scores(
        output.logits, output.penultimate, output.channel_statistics, list(statistics)
    )


def apply_heads(heads: Heads, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p_correct, p_ood)``, each ``(B,)``, from head inputs: the one ``1 -`` lives here."""
    correct_head, ood_head = heads.compiled or (heads.p_correct, heads.p_ood)
    p_correct = correct_head.predict_proba(inputs)[:, 1]
    p_ood = 1.0 - ood_head.predict_proba(inputs)[:, 1]
    return p_correct, p_ood


def form_answer(
    output: EngineOutput, statistics: Sequence[FeatureSpaceStatistics], heads: Heads
) -> EnsembleAnswer:
    """Engine output of all members -> the served answer (the one place it is formed)."""
    feature_space = feature_space_of(output, statistics)
    p_correct, p_ood = apply_heads(heads, head_inputs(output, feature_space))
    mean_probabilities = output.probabilities.astype(np.float64).mean(axis=0)  # (B, 10)
    scores = ensemble_scores(output.probabilities, feature_space)
    return EnsembleAnswer(
        probabilities=mean_probabilities,
        prediction=mean_probabilities.argmax(axis=1),
        entropy=-scores["predictive_entropy"],
        softmax_baseline=scores["softmax_baseline"],
        gradient_metrics=output.gradient_metrics.astype(np.float64).mean(axis=0),
        scores=scores,
        p_correct=p_correct,
        p_ood=p_ood,
        is_ood=p_ood >= heads.ood_threshold,
        member_scores=feature_space,
    )
