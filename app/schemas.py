"""Response models of the HTTP contract (DESIGN.md section 5), so /docs shows the real shapes.

Directions: ``p_correct`` is the probability that the prediction is right (higher is more
trustworthy); ``p_ood`` the probability that the input is out of distribution (higher is
less familiar); ``entropy`` grows and ``softmax_baseline`` shrinks with uncertainty.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scoring.scores import FEATURE_SPACE_SCORE_NAMES, SCORE_DESCRIPTIONS

__all__ = [
    "BatchScoreResponse",
    "EvaluationRecord",
    "EvaluationReport",
    "GradientMetrics",
    "HealthResponse",
    "MeanStd",
    "MemberScore",
    "Problem",
    "ReadyResponse",
    "ScoreResult",
]


class GradientMetrics(BaseModel):
    """Statistics of one layer's per-sample loss gradient (weights and biases together)."""

    abs_norm: float = Field(description="sum of |g_i|")
    euclidean_norm: float = Field(description="sqrt(sum of g_i^2)")
    min: float
    max: float
    mean: float
    skewness: float = Field(description="m3 / m2^(3/2), population moments; 0 where m2 = 0")
    kurtosis: float = Field(description="m4 / m2^2 - 3 (excess), population; 0 where m2 = 0")


_GRADIENT_METRICS_DESCRIPTION = (
    "per layer (conv1, conv2, conv3, dense) and over the whole network ('all')"
)


class MemberScore(BaseModel):
    """One ensemble member's view of the image (``include_members=true``)."""

    model_config = ConfigDict(extra="allow")

    member: int = Field(description="index of the member in the bundle")
    prediction: int = Field(ge=0)
    probabilities: list[float] = Field(min_length=2)
    entropy: float
    softmax_baseline: float
    gradient_metrics: dict[str, GradientMetrics] = Field(description=_GRADIENT_METRICS_DESCRIPTION)
    scores: dict[str, float] = Field(
        description="this member's feature-space confidences "
        f"({', '.join(FEATURE_SPACE_SCORE_NAMES)}); larger = more familiar"
    )


class ScoreResult(BaseModel):
    """The score object: the ensemble's prediction and its uncertainty."""

    request_id: str = Field(
        description="opaque id of this answer, unique per image; POST /feedback takes it"
    )
    prediction: int = Field(ge=0, description="predicted class index (argmax of probabilities)")
    label: str = Field(
        description="the predicted class's name from the bundle ('0'..'9' for digits)"
    )
    probabilities: list[float] = Field(
        min_length=2, description="mean of the members' softmax outputs, one per class"
    )
    entropy: float = Field(description="natural-log entropy of probabilities (higher: less sure)")
    softmax_baseline: float = Field(description="max of probabilities (higher: more sure)")
    gradient_metrics: dict[str, GradientMetrics] = Field(
        description=_GRADIENT_METRICS_DESCRIPTION + ", mean over members"
    )
    scores: dict[str, float] = Field(
        description="every other uncertainty score the bundle computes, by name, each a "
        "confidence (larger = more in-distribution / more likely correct): "
        + "; ".join(f"{name}: {text}" for name, text in SCORE_DESCRIPTIONS.items())
    )
    p_correct: float = Field(
        ge=0,
        le=1,
        description="calibrated probability that the prediction is correct (ensemble-level head "
        "on gradient metrics, softmax, feature-space and ensemble scores)",
    )
    p_ood: float = Field(
        ge=0,
        le=1,
        description="calibrated probability that the input is out of distribution (calibrated "
        "on calibration digits mixed with known unknowns; see the report)",
    )
    is_ood: bool = Field(
        description="p_ood at or above the bundle's threshold, which 95% of held-out "
        "calibration digits stay below"
    )
    model_version: str
    members: list[MemberScore] | None = Field(
        default=None, description="per-member detail, only with include_members=true"
    )


class BatchScoreResponse(BaseModel):
    results: list[ScoreResult] = Field(description="one score object per image, in the order sent")


class MeanStd(BaseModel):
    mean: float | None
    std: float | None


class EvaluationRecord(BaseModel):
    """One score evaluated on one comparison, mean and standard deviation over members."""

    model_config = ConfigDict(extra="allow")

    score: str
    concept: str
    auroc: MeanStd
    aupr_in: MeanStd
    aupr_out: MeanStd
    fpr_at_95_tpr: MeanStd


class EvaluationReport(BaseModel):
    """The bundle's ``report/evaluation.json``, served as it is."""

    model_config = ConfigDict(extra="allow")

    records: list[EvaluationRecord]
    known_unknowns: list[dict]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model_version: str
    providers: dict[str, str] = Field(
        description="scorer graph file -> execution provider it really runs on"
    )
    bundle_dir: str
    max_batch_size: int = Field(description="most images the batcher gives the engine at once")


class Problem(BaseModel):
    """RFC 9457 problem details; limit errors add ``limit`` and ``limit_value``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
