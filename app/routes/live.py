"""GET /metrics/live: the offline report's measures on labelled live traffic, and drift.

Including this router starts the app's live store (its lifespan, ``app.store.lifespan``);
POST /feedback and the recording of served answers use that store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.dependencies import MetricsDep, SettingsDep
from app.routes._docs import problem_responses
from app.store import StoreUnavailable
from app.store.lifespan import (
    LiveStoreUnavailable,
    StoreDep,
    compute_live_report,
    loaded_model_version,
    store_lifespan,
)
from app.store.writer import TRANSIENT_ERRORS

router = APIRouter(tags=["live quality"], lifespan=store_lifespan)


class Counts(BaseModel):
    scored: int = Field(description="images scored in the window")
    labelled: int = Field(description="of those, images with feedback")
    labelled_in_distribution: int
    labelled_ood: int = Field(description="feedback said: none of the classes")
    correct: int = Field(description="labelled in distribution and predicted right")


class Accuracy(BaseModel):
    value: float | None = Field(description="correct / labelled_in_distribution")
    count: int
    reason: str | None = Field(description="why value is null")


class QualityRecord(BaseModel):
    """One score on one comparison (correct images are the positives)."""

    comparison: str = Field(description="correct_vs_wrong, correct_vs_ood or correct_vs_rest")
    score: str = Field(
        description="p_correct, p_ood, softmax_baseline, entropy, or scores.<name>; each "
        "taken as a confidence (p_ood and entropy negated)"
    )
    count: int
    positives: int
    negatives: int
    auroc: float | None
    aupr_in: float | None
    aupr_out: float | None
    fpr_at_95_tpr: float | None
    reason: str | None = Field(description="why the measures are null")


class DriftRecord(BaseModel):
    """A served score's distribution in the window against the calibration split's."""

    score: str
    count: int = Field(description="served values in the window")
    reference_count: int = Field(description="calibration values in the bundle")
    psi: float | None = Field(description="population stability index over reference deciles")
    ks_statistic: float | None = Field(description="two-sample Kolmogorov-Smirnov statistic")
    ks_pvalue: float | None
    reason: str | None = Field(description="why the figures are null")


class LiveReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    window_s: float
    since: str = Field(description="start of the window, ISO 8601 UTC")
    until: str
    model_version: str | None = Field(description="rows of this model version only")
    counts: Counts
    accuracy: Accuracy
    quality: list[QualityRecord]
    drift: list[DriftRecord]


WindowQuery = Annotated[
    float | None,
    Query(
        gt=0,
        le=3.2e9,
        description="window length in seconds, at most about 100 years "
        "(default GRADUNC_LIVE_WINDOW_S)",
    ),
]
ModelVersionQuery = Annotated[
    str | None,
    Query(max_length=200, description="model version to report (default: the loaded one)"),
]


@router.get(
    "/metrics/live",
    response_model=LiveReport,
    summary="Live quality on labelled traffic, and drift",
    responses={
        **problem_responses(422),
        503: {
            **problem_responses(503)[503],
            "description": "The live store is unreachable or still starting (Retry-After), "
            "or recording is off (GRADUNC_STORE_ENABLED=false, no Retry-After).",
        },
    },
)
async def live_metrics(
    request: Request,
    settings: SettingsDep,
    metrics: MetricsDep,
    store: StoreDep,
    window_s: WindowQuery = None,
    model_version: ModelVersionQuery = None,
) -> Any:
    """Over the served images of the last `window_s` seconds: counts, accuracy, and for
    p_correct, p_ood, the softmax baseline, entropy and the `scores` the measures of GET
    /metrics (AUROC, AUPR-In, AUPR-Out, FPR at 95% TPR) from the feedback received;
    drift (PSI, KS) of p_ood, p_correct and the softmax baseline against the bundle's
    calibration split. Undefined figures are null with a `reason`."""
    window = window_s or settings.live_window_s
    version = model_version or loaded_model_version(request.app)
    try:
        report = await asyncio.to_thread(
            compute_live_report,
            store,
            request.app.state.live_references,
            settings.bundle_dir,
            window_s=window,
            model_version=version,
        )
    except StoreUnavailable as error:
        raise LiveStoreUnavailable.from_error(error, settings.retry_after_s) from None
    except TRANSIENT_ERRORS as error:
        raise LiveStoreUnavailable(
            f"the live store ({store.backend}) cannot be read: {type(error).__name__}",
            retry_after_s=settings.retry_after_s,
        ) from None
    if window == settings.live_window_s and model_version is None:
        metrics.live.observe(report, time.time())  # the gauges show the default view
    return report
