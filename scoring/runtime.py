"""The scoring runtime: a verified bundle's engine and meta heads, turned into answers.

The service is thin HTTP over :class:`UncertaintyScorer`; the pipeline's end-to-end
checks use it too. For each image it returns the score object of the HTTP contract
(DESIGN.md section 5). How the ensemble's members are combined:

- ``probabilities``: the mean of the members' softmax outputs; ``prediction`` its argmax;
  ``entropy`` and ``softmax_baseline`` are taken of that mean (the deep-ensemble
  predictive distribution).
- ``gradient_metrics``: the mean over members of each statistic.
- ``p_correct`` / ``p_ood``: the mean over members of each member's own meta classifier
  applied to that member's feature vector (each head was fitted on its member's own
  validation split, so no head ever saw its member's training images). Every meta
  classifier is oriented like the report's scores: ``predict_proba(X)[:, 1]`` is the
  probability of the positive class, "correct" for the p_correct head and
  "in-distribution" for the p_ood head, so ``p_ood = 1 - predict_proba(X)[:, 1]``.
- ``is_ood``: ``p_ood >= ood_threshold``, the threshold stored in the bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scoring.bundle import Bundle, load_bundle
from scoring.engine import EngineOutput, ScorerEngine
from scoring.features import LAYER_NAMES, METRIC_NAMES

__all__ = ["UncertaintyScorer"]

#: Batch size of the warm-up pass: large enough to allocate what a typical batch needs.
WARM_UP_BATCH = 8


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    """Natural-log entropy over the last axis, with 0 log 0 = 0."""
    p = np.clip(probabilities.astype(np.float64), 1e-30, 1.0)
    return -(probabilities * np.log(p)).sum(axis=-1)


def _metrics_dict(gradient_metrics: np.ndarray) -> dict[str, dict[str, float]]:
    """(L, S) array -> {layer: {metric: value}}."""
    return {
        layer: {metric: float(gradient_metrics[i, j]) for j, metric in enumerate(METRIC_NAMES)}
        for i, layer in enumerate(LAYER_NAMES)
    }


class UncertaintyScorer:
    """Scores uint8 (B, 28, 28) images with a bundle's ensemble and meta classifiers."""

    def __init__(self, bundle: Bundle, engine: ScorerEngine, heads: dict[str, list]) -> None:
        self.bundle = bundle
        self.engine = engine
        self.p_correct_heads = heads["p_correct"]
        self.p_ood_heads = heads["p_ood"]
        self.model_version = bundle.model_version
        self.ood_threshold = bundle.ood_threshold
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
        """Verify the bundle's hashes, then create the sessions and load the heads."""
        bundle = load_bundle(bundle_dir)
        engine = ScorerEngine(bundle.graph_paths, providers=providers, threads=threads)
        return cls(bundle, engine, bundle.load_heads())

    def warm_up(self) -> None:
        """One pass over zeros, so the first request does not pay for allocation."""
        self.score(np.zeros((WARM_UP_BATCH, 28, 28), dtype=np.uint8))

    def head_probabilities(self, output: EngineOutput) -> tuple[np.ndarray, np.ndarray]:
        """Per-member p_correct and p_ood, each (M, B)."""
        features = output.features()  # (M, B, F)
        p_correct = np.stack(
            [head.predict_proba(features[k])[:, 1] for k, head in enumerate(self.p_correct_heads)]
        )
        p_in_distribution = np.stack(
            [head.predict_proba(features[k])[:, 1] for k, head in enumerate(self.p_ood_heads)]
        )
        p_ood = 1.0 - p_in_distribution
        return p_correct, p_ood

    def score(self, images: np.ndarray, include_members: bool = False) -> list[dict[str, Any]]:
        """One score object per image, in input order."""
        output = self.engine.run(images)
        p_correct, p_ood = self.head_probabilities(output)  # (M, B) each
        mean_probabilities = output.probabilities.mean(axis=0)  # (B, 10)
        entropy = _entropy(mean_probabilities)
        mean_metrics = output.gradient_metrics.mean(axis=0)  # (B, L, S)
        ensemble_p_correct = p_correct.mean(axis=0)
        ensemble_p_ood = p_ood.mean(axis=0)
        results = []
        for b in range(len(mean_probabilities)):
            result = {
                "prediction": int(mean_probabilities[b].argmax()),
                "probabilities": [float(p) for p in mean_probabilities[b]],
                "entropy": float(entropy[b]),
                "softmax_baseline": float(mean_probabilities[b].max()),
                "gradient_metrics": _metrics_dict(mean_metrics[b]),
                "p_correct": float(ensemble_p_correct[b]),
                "p_ood": float(ensemble_p_ood[b]),
                "is_ood": bool(ensemble_p_ood[b] >= self.ood_threshold),
                "model_version": self.model_version,
            }
            if include_members:
                result["members"] = [
                    {
                        "member": k,
                        "prediction": int(output.probabilities[k, b].argmax()),
                        "probabilities": [float(p) for p in output.probabilities[k, b]],
                        "entropy": float(output.entropy[k, b]),
                        "softmax_baseline": float(output.softmax_baseline[k, b]),
                        "gradient_metrics": _metrics_dict(output.gradient_metrics[k, b]),
                        "p_correct": float(p_correct[k, b]),
                        "p_ood": float(p_ood[k, b]),
                    }
                    for k in range(output.probabilities.shape[0])
                ]
            results.append(result)
        return results
