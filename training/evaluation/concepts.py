"""The concepts of an evaluation: which images are evaluated, which are fitted on, and
the comparisons every score is measured on.

A comparison pairs a confidence with ``positive`` (correct / in-distribution):
:data:`CORRECT_VS_WRONG` compares the correct and wrong predictions on the digits' test
split; a concept name compares the correct test predictions with that concept's
evaluation images.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

from training.evaluation.metrics import UndefinedMetricWarning, threshold_metrics

__all__ = [
    "CORRECT_VS_WRONG",
    "check_images",
    "comparisons",
    "evaluate_on_comparisons",
    "split_known_unknowns",
]

#: The in-distribution comparison: correct vs wrong predictions on the test digits.
CORRECT_VS_WRONG = "mnist_correct_vs_wrong"


def check_images(images, name: str) -> np.ndarray:
    """``images`` as contiguous uint8 ``(N, 28, 28)``, or a ValueError that names them."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{name!r} must be uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    return np.ascontiguousarray(images)


def split_known_unknowns(
    sources: dict[str, np.ndarray], config
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Evaluation images per concept and known-unknown training images per concept.

    ``"<concept>_train"`` entries are training parts as given; a concept without one
    gives its first ``count`` images (after a seeded permutation) to training.
    ``config`` gives ``train_counts()`` (concept -> count) and ``split_seed``
    (an ``EvaluationConfig``).
    """
    evaluation, training = {}, {}
    for name, images in sources.items():
        if not name.endswith("_train"):
            evaluation[name] = check_images(images, f"known_unknown_sources[{name!r}]")
    for concept, count in config.train_counts().items():
        given = sources.get(f"{concept}_train")
        if given is not None:
            training[concept] = check_images(given, f"known_unknown_sources['{concept}_train']")
            continue
        if concept not in evaluation:
            continue
        images = evaluation[concept]
        if count >= len(images):
            raise ValueError(
                f"known_unknown_sources[{concept!r}] has {len(images)} images; {count} are "
                "split off for training and at least one must remain for evaluation"
            )
        seed = config.split_seed + int(hashlib.sha256(concept.encode()).hexdigest()[:8], 16)
        order = np.random.default_rng(seed).permutation(len(images))
        training[concept] = images[np.sort(order[:count])]
        evaluation[concept] = images[np.sort(order[count:])]
    return evaluation, training


def comparisons(
    test_confidence: np.ndarray,
    test_correct: np.ndarray,
    concept_confidences: dict[str, np.ndarray],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Comparison name -> (confidence, positive) with positive = correct / in-distribution."""
    pairs = {CORRECT_VS_WRONG: (test_confidence, test_correct)}
    positives = test_confidence[test_correct]
    for concept, confidence in concept_confidences.items():
        pairs[concept] = (
            np.concatenate([positives, confidence]),
            np.r_[np.ones(len(positives), bool), np.zeros(len(confidence), bool)],
        )
    return pairs


def evaluate_on_comparisons(
    test_confidence: np.ndarray,
    test_correct: np.ndarray,
    concept_confidences: dict[str, np.ndarray],
) -> dict[str, dict[str, float]]:
    """Comparison name -> :func:`threshold_metrics` of one score on every comparison."""
    with warnings.catch_warnings():
        # a member without wrong test predictions: nan, counted once in the report
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return {
            comparison: threshold_metrics(confidence, positive)
            for comparison, (confidence, positive) in comparisons(
                test_confidence, test_correct, concept_confidences
            ).items()
        }
