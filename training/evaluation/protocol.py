"""The paper's evaluation protocol, made precise (DESIGN.md section 4).

Entry point: :func:`run_evaluation` (the bundle builder calls it)::

    result = run_evaluation(members, known_unknown_sources, report_dir, cache_dir)
    result.report                             # the paper-level tables (evaluation.json)

Inputs
------
``members`` - one :class:`MemberInput` per ensemble member, in member order: its torch
model (``PaperCNN``, eval mode; used for the MC-dropout, energy and GradNorm
baselines), its scorer graph path(s) (``ScorerEngine(graph_paths)`` must yield exactly
this one member), and its own validation and test images (uint8 ``(N, 28, 28)``) and
labels from the pooled known concept, plus its seed.

``known_unknown_sources`` - concept name -> uint8 images ``(N, 28, 28)``: every unknown
concept to evaluate (e.g. ``notmnist``, ``omniglot_latin``, ``cifar10``,
``omniglot_other``, ``uniform_noise``, ``normal_noise``). The concepts named in
``EvaluationConfig.known_unknown_train_counts`` also provide the *known-unknown
training images*: an entry ``"<concept>_train"`` is used as that training part as
given (e.g. 200 uniform-noise images generated from another seed than the evaluated
noise); without one, a seeded permutation (``config.split_seed``) splits the first
``count`` images off the concept for training and evaluates on the rest. Either way a
meta classifier is never evaluated on an image it was fitted on.

What is computed
----------------
Features (probabilities and the 37-feature vector of every member) come from the
shared scorer engine, for every member on every image set, and are cached in
``cache_dir`` (:mod:`training.evaluation.feature_cache`).

For every member k (its own splits), with *confidence* meaning "larger = more likely
correct / in-distribution":

(a) single-metric thresholding of each of the 37 features, (b) the five meta
    classifiers and (d) the baselines: every score of the registry
    :func:`training.evaluation.paper_scores.paper_scores`, fitted on member k's
    validation split (label 1 = correct) and evaluated unchanged on test data;
(c) the known-unknowns study (:mod:`training.evaluation.known_unknowns`): the meta
    classifiers refitted with known-unknown training images labelled incorrect, a column
    whose concept contributed training images marked ``seen``;

each evaluated on the comparisons of :mod:`training.evaluation.concepts`
(``mnist_correct_vs_wrong`` on member k's test split, and every concept against member
k's correct test predictions; the record's ``concept`` is the comparison's name).
(e) Every number is reported as mean and standard deviation (``ddof=1``; 0 for one
member) over members.

The served heads are not fitted here: they are ensemble-level and live in
:mod:`training.evaluation.service_level`. Since every member trains on the member pool
only, the official test split is new to every member, and the ensemble baselines on it
are honest; member k's validation split was training data of the other members, which is
why nothing ensemble-level is fitted on validation splits.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation.baselines import BaselineConfig
from training.evaluation.concepts import (
    CORRECT_VS_WRONG,
    check_images,
    comparisons,
    evaluate_on_comparisons,
    split_known_unknowns,
)
from training.evaluation.feature_cache import (
    EngineFeatureExtractor,
    FeatureCache,
    FeatureExtractor,
    ImageSetFeatures,
)
from training.evaluation.known_unknowns import MemberFeatures, known_unknowns_study
from training.evaluation.meta import MetaConfig
from training.evaluation.metrics import UndefinedMetricWarning, aggregate_over_members
from training.evaluation.paper_scores import (
    FeatureThreshold,
    Score,
    ScoreInputs,
    paper_scores,
)

__all__ = [
    "DEFAULT_KNOWN_UNKNOWN_SETS",
    "EvaluationConfig",
    "EvaluationResult",
    "MemberInput",
    "run_evaluation",
]


@dataclass
class MemberInput:
    """One ensemble member and its own splits of the known concept."""

    model: Any  # PaperCNN in eval mode (torch); only the baselines run it
    graph_paths: Sequence[Path]  # this member's scorer graph(s): exactly one member
    validation_images: np.ndarray  # (N_val, 28, 28) uint8
    validation_labels: np.ndarray  # (N_val,) int
    test_images: np.ndarray  # (N_test, 28, 28) uint8
    test_labels: np.ndarray  # (N_test,) int
    seed: int = 0

    def __post_init__(self) -> None:
        self.graph_paths = [Path(path) for path in self.graph_paths]
        for split in ("validation", "test"):
            images = check_images(getattr(self, f"{split}_images"), f"{split}_images")
            labels = np.asarray(getattr(self, f"{split}_labels")).astype(np.int64).reshape(-1)
            if len(labels) != len(images):
                raise ValueError(
                    f"MemberInput: {len(labels)} {split}_labels for {len(images)} {split}_images"
                )
            setattr(self, f"{split}_images", images)
            setattr(self, f"{split}_labels", labels)


#: The paper's four known-unknown training sets plus normal noise for comparison:
#: (name, concepts whose training images are added to the validation split).
DEFAULT_KNOWN_UNKNOWN_SETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("validation", ()),
    ("validation+uniform_noise", ("uniform_noise",)),
    ("validation+uniform_noise+cifar10", ("uniform_noise", "cifar10")),
    ("validation+uniform_noise+cifar10+omniglot", ("uniform_noise", "cifar10", "omniglot_other")),
    ("validation+normal_noise", ("normal_noise",)),
)


@dataclass(frozen=True)
class EvaluationConfig:
    """Every choice of the protocol; each value not fixed by the paper is a chosen default."""

    meta: MetaConfig = field(default_factory=MetaConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    # Known-unknown training images per concept (paper: 200 uniform-noise images; the
    # CIFAR-10 and Omniglot counts are chosen defaults, a minority of each concept so
    # that most of it stays for evaluation; normal noise matches uniform noise).
    known_unknown_train_counts: tuple[tuple[str, int], ...] = (
        ("uniform_noise", 200),
        ("normal_noise", 200),
        ("cifar10", 1_000),
        ("omniglot_other", 500),
    )
    known_unknown_sets: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_KNOWN_UNKNOWN_SETS
    # Paper: the network meta classifier (it beat the LASSO there); the LASSO is kept
    # for comparison, as the paper ran both.
    known_unknown_models: tuple[str, ...] = ("neural_net", "lasso")
    split_seed: int = 0
    # Batch size of the scorer engine; only memory and speed depend on it.
    feature_batch_size: int = 1_024
    # The member whose raw scores the violin plots and curves show.
    plot_member: int = 0

    def train_counts(self) -> dict[str, int]:
        return dict(self.known_unknown_train_counts)


@dataclass
class EvaluationResult:
    """Everything the protocol produced; :attr:`report` is what ``GET /metrics`` serves."""

    report: dict[str, Any]  # evaluation.json
    plot_data: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def records(self) -> list[dict]:
        return self.report["records"]

    @property
    def tables(self) -> dict[str, list[dict]]:
        """The report's tables by name (records, known unknowns, claims, members...)."""
        return {key: value for key, value in self.report.items() if isinstance(value, list)}


# ------------------------------------------------------------------------ orchestration

#: The scores whose curves the report draws for ``config.plot_member``.
_PLOTTED_SCORES: tuple[tuple[str, str], ...] = (
    ("feature", "entropy"),
    ("feature", "softmax_baseline"),
    ("feature", "euclidean_norm@all"),
    ("feature", "min@all"),
    ("meta_classifier", "lasso"),
    ("meta_classifier", "neural_net"),
    ("baseline", "energy"),
)


def run_evaluation(
    members: list[MemberInput],
    known_unknown_sources: dict[str, np.ndarray],
    report_dir: Path | None,
    cache_dir: Path,
    config: EvaluationConfig = EvaluationConfig(),  # noqa: B008 - frozen, immutable
    progress: bool = True,
    feature_extractor: FeatureExtractor | None = None,
) -> EvaluationResult:
    """Run the whole protocol, write the report into ``report_dir`` and return the result.

    Parameters
    ----------
    members : list of MemberInput
        The ensemble, in member order (at least one).
    known_unknown_sources : dict of str to ndarray of shape (N, 28, 28), uint8
        The unknown concepts and optional ``"<concept>_train"`` training parts (module
        docstring).
    report_dir : Path
        Receives ``evaluation.json``, ``report.md``, ``index.html`` and ``plots/``.
    cache_dir : Path
        Feature cache (``.npz``), reused when its key matches.
    config : EvaluationConfig, default=EvaluationConfig()
    progress : bool, default=True
        Print one line per stage.
    feature_extractor : FeatureExtractor, default=None
        Where features come from; None builds the shared scorer engine over every
        member's ``graph_paths``.

    Returns
    -------
    EvaluationResult
    """
    from training.evaluation.claims import compute_claims
    from training.evaluation.report import write_report

    if not members:
        raise ValueError("The 'members' parameter must hold at least one MemberInput, got []")
    if not 0 <= config.plot_member < len(members):
        raise ValueError(
            f"The 'plot_member' setting must index one of the {len(members)} members, "
            f"got {config.plot_member!r}"
        )
    started = time.perf_counter()

    def log(message: str) -> None:
        if progress:
            print(f"[evaluation {time.perf_counter() - started:6.1f} s] {message}", flush=True)

    if feature_extractor is None:
        paths = [path for member in members for path in member.graph_paths]
        feature_extractor = EngineFeatureExtractor(paths, config.feature_batch_size)
    concepts, known_unknown_images = split_known_unknowns(known_unknown_sources, config)
    sets = _ImageSets.compute(
        members, concepts, known_unknown_images, FeatureCache(cache_dir, feature_extractor, log)
    )
    member_features = [sets.member_features(k, member) for k, member in enumerate(members)]

    # ---- (a) single metrics, (b) meta classifiers, (d) baselines: per member
    per_score: dict[tuple[str, str], list[dict[str, dict[str, float]]]] = {}
    directions: list[dict[str, int]] = []
    plot: dict[str, Any] = {
        "member": config.plot_member,
        "groups": {},
        "curves": {},
        "reliability": [],
    }
    for k, (member, features) in enumerate(zip(members, member_features, strict=True)):
        log(f"member {k}: thresholds, meta classifiers, baselines")
        scores = _fit_member_scores(k, member, features, sets, config)
        directions.append({s.name: s.direction for s in scores if isinstance(s, FeatureThreshold)})
        confidences = _member_confidences(scores, k, member, features, sets, concepts)
        for key, (test, by_concept) in confidences.items():
            evaluation = evaluate_on_comparisons(test, features.test_correct, by_concept)
            per_score.setdefault(key, []).append(evaluation)
        if k == config.plot_member:
            plot["groups"] = {
                "mnist correct": features.test[features.test_correct],
                "mnist wrong": features.test[~features.test_correct],
                **features.concepts,
            }
            plot["curves"] = _curves(confidences, features.test_correct)

    records = [
        {"score": score, "kind": kind, "concept": comparison, **aggregate_over_members(at)}
        for (kind, score), evaluations in per_score.items()
        for comparison in [CORRECT_VS_WRONG, *concepts]
        for at in [[evaluation[comparison] for evaluation in evaluations]]
    ]

    # ---- (c) known unknowns
    log("known-unknowns study")
    known_unknown_rows = known_unknowns_study(
        member_features,
        list(concepts),
        config.known_unknown_sets,
        config.known_unknown_models,
        config.meta,
    )

    # ---- the report
    registry = paper_scores(config.meta, config.baselines, seed=0)
    by_kind = {
        kind: [score.describe() for score in registry if score.kind == kind]
        for kind in ("meta_classifier", "baseline")
    }
    report: dict[str, Any] = {
        "records": records,
        "known_unknowns": known_unknown_rows,
        "meta_classifiers": by_kind["meta_classifier"],
        "baselines": by_kind["baseline"],
        "claims": [],
        "members": _member_rows(members, member_features, directions),
        "concepts": {
            name: {
                "evaluation_images": int(len(images)),
                "training_images": int(len(known_unknown_images.get(name, ()))),
            }
            for name, images in concepts.items()
        },
        "comparisons": [CORRECT_VS_WRONG, *concepts],
        "orientation": (
            "Every score is a confidence: larger means more likely a correct prediction on "
            "an in-distribution input. AUPR-In takes correct / in-distribution as positive, "
            "AUPR-Out incorrect / out-of-distribution with the negated confidence. "
            f"'{CORRECT_VS_WRONG}' compares each member's correct and wrong test "
            "predictions; a concept name compares the correct test predictions with that "
            "concept's evaluation images. mean and std (ddof=1) are over members."
        ),
    }
    report["claims"] = compute_claims(report)
    result = EvaluationResult(report=report, plot_data=plot)
    if report_dir is not None:
        log("writing the report")
        write_report(result, Path(report_dir))
    log("done")
    return result


# ------------------------------------------------------------------------ the steps


@dataclass
class _ImageSets:
    """Every member's outputs on every image set (cached features)."""

    concepts: dict[str, ImageSetFeatures]
    known_unknowns: dict[str, ImageSetFeatures]  # training parts
    validation: list[ImageSetFeatures]  # member k's validation split, all members
    test: list[ImageSetFeatures]

    @classmethod
    def compute(
        cls,
        members: Sequence[MemberInput],
        concepts: dict[str, np.ndarray],
        known_unknown_images: dict[str, np.ndarray],
        cache: FeatureCache,
    ) -> _ImageSets:
        unknown_names = {name: f"{name} (known-unknown training)" for name in known_unknown_images}
        validation_names = [f"member {k} validation" for k in range(len(members))]
        test_names = [f"member {k} test" for k in range(len(members))]
        image_sets = {
            **concepts,
            **{unknown_names[name]: images for name, images in known_unknown_images.items()},
            **dict(zip(validation_names, [m.validation_images for m in members], strict=True)),
            **dict(zip(test_names, [m.test_images for m in members], strict=True)),
        }
        results = cache.get_many(image_sets)  # every set in one pass: parallel on Ray
        for result in results.values():
            if result.features.shape[0] != len(members):
                raise ValueError(
                    f"The feature extractor yields {result.features.shape[0]} members for "
                    f"{len(members)} MemberInputs; each member's graph_paths must give one member"
                )
        return cls(
            concepts={name: results[name] for name in concepts},
            known_unknowns={name: results[unknown_names[name]] for name in known_unknown_images},
            validation=[results[name] for name in validation_names],
            test=[results[name] for name in test_names],
        )

    def member_features(self, k: int, member: MemberInput) -> MemberFeatures:
        validation, test = self.validation[k], self.test[k]
        return MemberFeatures(
            seed=member.seed,
            validation=validation.features[k].astype(np.float64),
            validation_correct=validation.probabilities[k].argmax(1) == member.validation_labels,
            test=test.features[k].astype(np.float64),
            test_correct=test.probabilities[k].argmax(1) == member.test_labels,
            concepts={c: f.features[k].astype(np.float64) for c, f in self.concepts.items()},
            known_unknowns={
                c: f.features[k].astype(np.float64) for c, f in self.known_unknowns.items()
            },
        )


def _fit_member_scores(
    k: int,
    member: MemberInput,
    features: MemberFeatures,
    sets: _ImageSets,
    config: EvaluationConfig,
) -> list[Score]:
    """Every registry score fitted on member k's validation split (meta classifiers
    left out, with a warning, when that split has one class only)."""
    scores = paper_scores(config.meta, config.baselines, member.seed)
    if not features.validation_has_both_classes:
        warnings.warn(
            f"member {k}: the validation split has only one class; meta classifiers skipped",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        scores = [score for score in scores if not score.needs_both_classes]
    validation = ScoreInputs(
        features.validation,
        sets.validation[k].probabilities,
        member.validation_images,
        member.model,
    )
    for score in scores:
        score.fit(validation, features.validation_correct)
    return scores


def _member_confidences(
    scores: Sequence[Score],
    k: int,
    member: MemberInput,
    features: MemberFeatures,
    sets: _ImageSets,
    concepts: dict[str, np.ndarray],
) -> dict[tuple[str, str], tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(kind, name) -> (confidence on member k's test split, {concept: confidence})."""
    test = ScoreInputs(features.test, sets.test[k].probabilities, member.test_images, member.model)
    by_concept = {
        c: ScoreInputs(features.concepts[c], f.probabilities, concepts[c], member.model)
        for c, f in sets.concepts.items()
    }
    return {
        (score.kind, score.name): (
            score.confidence(test),
            {c: score.confidence(inputs) for c, inputs in by_concept.items()},
        )
        for score in scores
    }


def _curves(confidences, test_correct: np.ndarray) -> dict[str, dict]:
    """comparison -> score -> (confidence, positive) for the plotted scores."""
    curves: dict[str, dict] = {}
    for kind, score in _PLOTTED_SCORES:
        if (kind, score) not in confidences:
            continue
        test_confidence, concept_confidence = confidences[(kind, score)]
        for comparison, pair in comparisons(
            test_confidence, test_correct, concept_confidence
        ).items():
            curves.setdefault(comparison, {})[score] = pair
    return curves


def _member_rows(
    members: Sequence[MemberInput],
    features: Sequence[MemberFeatures],
    directions: Sequence[dict[str, int]],
) -> list[dict]:
    return [
        {
            "member": k,
            "seed": member.seed,
            "validation_images": len(member.validation_images),
            "test_images": len(member.test_images),
            "validation_accuracy": float(data.validation_correct.mean()),
            "test_accuracy": float(data.test_correct.mean()),
            "validation_wrong": int((~data.validation_correct).sum()),
            "test_wrong": int((~data.test_correct).sum()),
            "directions": directions[k],
        }
        for k, (member, data) in enumerate(zip(members, features, strict=True))
    ]
