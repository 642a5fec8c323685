"""The scoring runtime: a verified bundle's engine, feature-space statistics and heads.

The service is thin HTTP over :class:`UncertaintyScorer`; the pipeline's end-to-end
checks use it too. For each image it returns an :class:`ImageScore`, the score object of
the HTTP contract (DESIGN.md section 5), formed by :func:`scoring.answer.form_answer`
(the one place member outputs become the served answer):

- ``probabilities``: the mean of the members' softmax outputs; ``prediction`` its argmax,
  ``label`` that class's name from the bundle; ``entropy`` and ``softmax_baseline`` of
  that mean (the deep-ensemble predictive distribution).
- ``gradient_metrics``: the mean over members of each statistic.
- ``scores``: every other score the bundle computes, by name, each a confidence.
- ``p_correct`` / ``p_ood``: the calibrated ensemble-level heads; ``is_ood`` is
  ``p_ood >= ood_threshold``, the threshold stored in the bundle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scoring.answer import Heads, form_answer
from scoring.bundle import Bundle, load_bundle
from scoring.engine import EngineOutput, ScorerEngine, validate_images
from scoring.features import LAYER_NAMES, METRIC_NAMES
from scoring.scores import FeatureSpaceStatistics

__all__ = ["ImageScore", "MemberDetail", "UncertaintyScorer"]

#: Batch size of the warm-up pass: large enough to allocate what a typical batch needs.
WARM_UP_BATCH = 8
#: :meth:`UncertaintyScorer.score` runs the engine on at most this many images at a time
#: (the service's largest batch, ``GRADUNC_MAX_BATCH_IMAGES``). onnxruntime's arena keeps
#: the memory of the largest batch a session ever ran: 3.2 GB for the five default members
#: after one batch of 1,000 images, 0.9 GB after 256. Answers do not depend on how images
#: are batched (``tests/test_service_level.py``), so a long array costs only memory it
#: would not have kept.
MAX_ENGINE_BATCH = 256


def _metrics_dict(gradient_metrics: np.ndarray) -> dict[str, dict[str, float]]:
    """(L, S) array -> {layer: {metric: value}}."""
    return {
        layer: {metric: float(gradient_metrics[i, j]) for j, metric in enumerate(METRIC_NAMES)}
        for i, layer in enumerate(LAYER_NAMES)
    }


@dataclass(frozen=True)
class MemberDetail:
    """One member's view of one image (``include_members``)."""

    member: int
    prediction: int
    probabilities: list[float]
    entropy: float
    softmax_baseline: float
    gradient_metrics: dict[str, dict[str, float]]
    scores: dict[str, float]  # the member's feature-space confidences


@dataclass(frozen=True)
class ImageScore:
    """The served answer for one image (the HTTP score object, less ``request_id``)."""

    prediction: int
    label: str
    probabilities: list[float]
    entropy: float
    softmax_baseline: float
    gradient_metrics: dict[str, dict[str, float]]
    scores: dict[str, float]
    p_correct: float
    p_ood: float
    is_ood: bool
    model_version: str
    members: list[MemberDetail] | None = None

    def score_object(self) -> dict[str, Any]:
        """This answer as the HTTP score object's fields (``members`` only when it was
        asked for): the one shape the service sends and offline comparisons read.

        The dict shares this answer's lists and dicts, which nothing changes afterwards:
        ``dataclasses.asdict`` copied them recursively, 60 us an image, about 4% of a
        64-image request's time in the service.
        """
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        members = values.pop("members")
        if members is not None:
            values["members"] = [dataclasses.asdict(member) for member in members]
        return values


class UncertaintyScorer:
    """Scores uint8 (B, 28, 28) images with a bundle's ensemble and heads."""

    def __init__(
        self,
        bundle: Bundle,
        engine: ScorerEngine,
        heads: Heads,
        statistics: Sequence[FeatureSpaceStatistics],
        max_engine_batch: int = MAX_ENGINE_BATCH,
    ) -> None:
        if max_engine_batch < 1:
            raise ValueError(f"max_engine_batch must be at least 1, got {max_engine_batch}")
        self.max_engine_batch = max_engine_batch
        self.bundle = bundle
        self.engine = engine
        self.heads = heads
        self.statistics = list(statistics)
        self.class_names = bundle.class_names
        self.model_version = bundle.model_version
        self.ood_threshold = heads.ood_threshold
        self.evaluation = bundle.evaluation()
        self.report_dir = bundle.report_dir
        self.providers_in_use = {
            path.name: provider
            for path, provider in zip(bundle.graph_paths, engine.providers_in_use, strict=True)
        }

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> UncertaintyScorer:
        """Verify the bundle's hashes, then create the sessions and load heads and statistics."""
        bundle = load_bundle(bundle_dir)
        engine = ScorerEngine(bundle.graph_paths, providers=providers, threads=threads)
        return cls(bundle, engine, bundle.load_heads(), bundle.load_feature_space())

    def warm_up(self) -> None:
        """One pass over zeros, so the first request does not pay for allocation."""
        self.score(np.zeros((WARM_UP_BATCH, 28, 28), dtype=np.uint8))

    def score(self, images: np.ndarray, include_members: bool = False) -> list[ImageScore]:
        """One :class:`ImageScore` per image, in input order; the engine runs on
        consecutive slices of at most ``max_engine_batch`` images."""
        images = validate_images(images)  # fail before the first batch, not in the middle
        step = self.max_engine_batch
        return [
            result
            for start in range(0, len(images), step)
            for result in self.image_scores(
                self.engine.run(images[start : start + step]), include_members
            )
        ]

    def image_scores(self, output: EngineOutput, include_members: bool = False) -> list[ImageScore]:
        """One :class:`ImageScore` per image of one engine batch's output: the answer
        formed by :func:`~scoring.answer.form_answer`, as objects."""
        answer = form_answer(output, self.statistics, self.heads)
        results = []
        for b in range(len(answer.prediction)):
            members = None
            if include_members:
                members = [
                    MemberDetail(
                        member=k,
                        prediction=int(output.probabilities[k, b].argmax()),
                        probabilities=[float(p) for p in output.probabilities[k, b]],
                        entropy=float(output.entropy[k, b]),
                        softmax_baseline=float(output.softmax_baseline[k, b]),
                        gradient_metrics=_metrics_dict(output.gradient_metrics[k, b]),
                        scores={
                            name: float(values[k, b])
                            for name, values in answer.member_scores.items()
                        },
                    )
                    for k in range(output.num_members)
                ]
            prediction = int(answer.prediction[b])
            results.append(
                ImageScore(
                    prediction=prediction,
                    label=self.class_names[prediction],
                    probabilities=[float(p) for p in answer.probabilities[b]],
                    entropy=float(answer.entropy[b]),
                    softmax_baseline=float(answer.softmax_baseline[b]),
                    gradient_metrics=_metrics_dict(answer.gradient_metrics[b]),
                    scores={name: float(values[b]) for name, values in answer.scores.items()},
                    p_correct=float(answer.p_correct[b]),
                    p_ood=float(answer.p_ood[b]),
                    is_ood=bool(answer.is_ood[b]),
                    model_version=self.model_version,
                    members=members,
                )
            )
        return results
