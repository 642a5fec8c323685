"""The paper's known-unknowns study: meta classifiers that have seen some outliers.

For every model of ``config.known_unknown_models`` and every training set of
``config.known_unknown_sets``, each member's meta classifier is refitted on its
validation split plus the known-unknown training images of the set's concepts (labelled
incorrect), then evaluated on the held-out comparisons. A column whose concept
contributed training images is marked ``seen``: it measures fitting, not transfer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.evaluation.concepts import CORRECT_VS_WRONG, evaluate_on_comparisons
from training.evaluation.meta import MetaConfig
from training.evaluation.metrics import aggregate_over_members
from training.evaluation.paper_scores import MetaClassifierScore, ScoreInputs

__all__ = ["MemberFeatures", "known_unknowns_study"]


@dataclass
class MemberFeatures:
    """One member's feature vectors (member axis removed) on its splits and concepts."""

    seed: int
    validation: np.ndarray  # (N_val, 37) float64
    validation_correct: np.ndarray  # (N_val,) bool
    test: np.ndarray  # (N_test, 37)
    test_correct: np.ndarray  # (N_test,) bool
    concepts: dict[str, np.ndarray]  # concept -> (N_c, 37)
    known_unknowns: dict[str, np.ndarray]  # concept -> training part (N, 37)

    @property
    def validation_has_both_classes(self) -> bool:
        return bool(self.validation_correct.any() and not self.validation_correct.all())


def known_unknowns_study(
    members: Sequence[MemberFeatures],
    concepts: Sequence[str],
    sets: Sequence[tuple[str, tuple[str, ...]]],
    models: Sequence[str],
    meta: MetaConfig,
) -> list[dict]:
    """One row per (model, training set, comparison): metrics as mean and std over members.

    A training set whose concepts lack training images is skipped with a warning; a
    member whose validation split has one class only is left out of the means.
    """
    available = [
        (name, added)
        for name, added in sets
        if all(all(concept in m.known_unknowns for m in members) for concept in added)
    ]
    for name, added in sets:
        if (name, added) not in available:
            missing = [c for c in added if not all(c in m.known_unknowns for m in members)]
            warnings.warn(
                f"known-unknowns training set {name!r} skipped: no training images for {missing}",
                stacklevel=2,
            )
    rows = []
    for model_name in models:
        for set_name, added in available:
            evaluations = [
                _refit_and_evaluate(model_name, member, added, meta)
                for member in members
                if member.validation_has_both_classes
            ]
            for comparison in [CORRECT_VS_WRONG, *concepts]:
                rows.append(
                    {
                        "model": model_name,
                        "training_set": set_name,
                        "concept": comparison,
                        "seen": comparison in added,
                        **aggregate_over_members([e[comparison] for e in evaluations]),
                    }
                )
    return rows


def _refit_and_evaluate(
    model_name: str, member: MemberFeatures, added: tuple[str, ...], meta: MetaConfig
) -> dict[str, dict[str, float]]:
    features = np.concatenate([member.validation, *[member.known_unknowns[c] for c in added]])
    correct = np.zeros(len(features), bool)
    correct[: len(member.validation)] = member.validation_correct
    score = MetaClassifierScore(model_name, meta, member.seed)
    score.fit(ScoreInputs(features), correct)
    return evaluate_on_comparisons(
        score.confidence(ScoreInputs(member.test)),
        member.test_correct,
        {c: score.confidence(ScoreInputs(values)) for c, values in member.concepts.items()},
    )
