"""The shapes of the service's answers (DESIGN.md section 5), as typed dictionaries.

Directions: ``p_correct`` and ``softmax_baseline`` grow with trust in the prediction,
``p_ood`` and ``entropy`` with doubt; every value in ``scores`` is oriented as a
confidence (larger = more in-distribution, more likely correct).
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

__all__ = ["BatchScores", "FeedbackItem", "GradientMetrics", "Score"]


class GradientMetrics(TypedDict):
    abs_norm: float
    euclidean_norm: float
    min: float
    max: float
    mean: float
    skewness: float
    kurtosis: float


class Score(TypedDict):
    """One image's score object."""

    prediction: int
    probabilities: list[float]
    entropy: float
    softmax_baseline: float
    gradient_metrics: dict[str, GradientMetrics]
    p_correct: float
    p_ood: float
    is_ood: bool
    model_version: str
    #: Set by the service (not by an in-process scorer): the id ``feedback`` refers to.
    request_id: NotRequired[str]
    #: The class name stored in the bundle ("0".."9" for digits).
    label: NotRequired[str]
    #: Every other uncertainty score, by name, oriented as a confidence.
    scores: NotRequired[dict[str, float]]
    #: Per-member detail, only with ``include_members=True``.
    members: NotRequired[list[dict[str, Any]]]


class BatchScores(TypedDict):
    results: list[Score]


class FeedbackItem(TypedDict):
    """Ground truth for one scored image: its true class (or None) and whether it is OOD."""

    request_id: str
    label: int | None
    ood: bool
