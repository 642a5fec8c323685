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
``cache_dir`` as ``.npz`` files keyed by the SHA-256 of the graph files, of the images
and :data:`FEATURE_CODE_VERSION`; a key that matches is reused.

For every member k (its own splits), with *confidence* meaning "larger = more likely
correct / in-distribution":

(a) single-metric thresholding of each of the 37 features, its direction fixed on
    member k's validation split (correct vs wrong) and applied unchanged to test data;
(b) the five meta classifiers (:mod:`training.evaluation.meta`) fitted on member k's
    validation features, label 1 = correct;
(c) the known-unknowns study: ``config.known_unknown_models`` refitted on validation
    plus known-unknown training images labelled incorrect, for each training set of
    ``config.known_unknown_sets``; every column is evaluated on held-out images, and a
    column whose concept contributed training images is marked ``seen``;
(d) the baselines (:mod:`training.evaluation.baselines`);

each evaluated on the comparisons ``mnist_correct_vs_wrong`` (member k's test split,
correct vs wrong predictions) and, for every concept, member k's correct test
predictions vs the concept's evaluation images (the record's ``concept`` is the concept
name). (e) Every number is reported as mean and standard deviation (``ddof=1``; 0 for
one member) over members.

The served heads are not fitted here: they are ensemble-level and live in
:mod:`training.evaluation.service_level`. Since every member trains on the member pool
only, the official test split is new to every member, and the ensemble baselines on it
are honest; member k's validation split was training data of the other members, which is
why nothing ensemble-level is fitted on validation splits.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scoring.bundle import file_sha256
from scoring.features import feature_names
from training.evaluation import baselines as baseline_scores
from training.evaluation.meta import (
    META_CLASSIFIER_NAMES,
    MetaConfig,
    fit_meta_classifier,
    positive_probability,
)
from training.evaluation.metrics import (
    METRIC_KEYS,
    UndefinedMetricWarning,
    fit_direction,
    threshold_metrics,
)

__all__ = [
    "FEATURE_CODE_VERSION",
    "CORRECT_VS_WRONG",
    "MemberInput",
    "EvaluationConfig",
    "EvaluationResult",
    "FeatureExtractor",
    "EngineFeatureExtractor",
    "ReferenceFeatureExtractor",
    "run_evaluation",
]

#: Part of every feature cache key: bump it when the meaning of cached features changes.
FEATURE_CODE_VERSION = "features-v1"

#: The in-distribution comparison: member k's correct vs wrong test predictions.
CORRECT_VS_WRONG = "mnist_correct_vs_wrong"


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
            images = _check_images(getattr(self, f"{split}_images"), f"{split}_images")
            labels = np.asarray(getattr(self, f"{split}_labels")).astype(np.int64).reshape(-1)
            if len(labels) != len(images):
                raise ValueError(
                    f"MemberInput: {len(labels)} {split}_labels for {len(images)} {split}_images"
                )
            setattr(self, f"{split}_images", images)
            setattr(self, f"{split}_labels", labels)


def _check_images(images, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{name!r} must be uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    return np.ascontiguousarray(images)


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
    baselines: baseline_scores.BaselineConfig = field(
        default_factory=baseline_scores.BaselineConfig
    )
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


# --------------------------------------------------------------------------- features


class FeatureExtractor(Protocol):
    """All members' outputs for a batch of images, like ``ScorerEngine.run_batched``."""

    def cache_token(self) -> str:
        """Identifies the computation (e.g. the graph files' SHA-256) for the cache key."""

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, 28, 28)`` -> probabilities ``(M, B, 10)``, features ``(M, B, 37)``."""


class EngineFeatureExtractor:
    """The shared scorer engine over every member's graph(s), in member order."""

    def __init__(self, graph_paths: Sequence[Path], batch_size: int = 1_024) -> None:
        from scoring.engine import ScorerEngine  # the service's engine: no train/serve skew

        self.graph_paths = [Path(path) for path in graph_paths]
        self.batch_size = batch_size
        self.engine = ScorerEngine(self.graph_paths)
        self._token = "engine:" + ",".join(file_sha256(path) for path in self.graph_paths)

    def cache_token(self) -> str:
        return self._token

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        output = self.engine.run_batched(images, self.batch_size)
        return np.asarray(output.probabilities), np.asarray(output.features())


class ReferenceFeatureExtractor:
    """The torch reference (:mod:`training.reference`) of the same features.

    For tests and experiments without exported graphs; the bundle uses the engine.
    """

    def __init__(self, models: Sequence[Any], batch_size: int = 512) -> None:
        import torch

        self.models = list(models)
        self.batch_size = batch_size
        digest = hashlib.sha256()
        for model in self.models:
            for name, tensor in model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().numpy().tobytes())
        self._token = "reference:" + digest.hexdigest()
        self._torch = torch

    def cache_token(self) -> str:
        return self._token

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from training.model import images_to_tensor
        from training.reference import reference_scores

        probabilities, features = [], []
        for model in self.models:
            member_probabilities, member_features = [], []
            for start in range(0, len(images), self.batch_size):
                batch = images_to_tensor(images[start : start + self.batch_size])
                scores = reference_scores(model, batch)
                member_probabilities.append(scores.probabilities.numpy())
                member_features.append(
                    np.concatenate(
                        [
                            scores.entropy.numpy()[:, None],
                            scores.softmax_baseline.numpy()[:, None],
                            scores.gradient_metrics.reshape(len(batch), -1).numpy(),
                        ],
                        axis=1,
                    )
                )
            probabilities.append(np.concatenate(member_probabilities))
            features.append(np.concatenate(member_features))
        return np.stack(probabilities).astype(np.float32), np.stack(features).astype(np.float32)


@dataclass
class ImageSetFeatures:
    """All members' outputs on one image set."""

    probabilities: np.ndarray  # (M, B, 10)
    features: np.ndarray  # (M, B, 37)


class FeatureCache:
    """``.npz`` files keyed by computation, images and code version (provenance inside)."""

    def __init__(self, cache_dir: Path, extractor: FeatureExtractor, log: Callable) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.extractor = extractor
        self.token = extractor.cache_token()
        self.log = log

    def get(self, name: str, images: np.ndarray) -> ImageSetFeatures:
        images_sha256 = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        provenance = {
            "computation": self.token,
            "images_sha256": images_sha256,
            "images_shape": list(images.shape),
            "code_version": FEATURE_CODE_VERSION,
            "feature_names": feature_names(),
        }
        key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()
        path = self.cache_dir / f"features_{key[:32]}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as cached:
                if json.loads(str(cached["provenance"])) == provenance:
                    return ImageSetFeatures(cached["probabilities"], cached["features"])
        started = time.perf_counter()
        probabilities, features = self.extractor(images)
        if features.shape[1:] != (len(images), len(feature_names())):
            raise ValueError(
                f"The feature extractor returned features of shape {features.shape} for "
                f"{len(images)} images; expected (members, {len(images)}, {len(feature_names())})"
            )
        if not (np.isfinite(features).all() and np.isfinite(probabilities).all()):
            bad = int((~np.isfinite(features)).any(axis=2).sum())
            raise ValueError(
                f"The feature extractor returned nan or infinite values for {name} "
                f"({bad} of {features.shape[0] * len(images)} member-image pairs); "
                "a member's weights may have diverged"
            )
        temporary = path.with_name(path.stem + ".tmp.npz")
        np.savez(
            temporary,
            probabilities=probabilities.astype(np.float32),
            features=features.astype(np.float32),
            provenance=np.array(json.dumps(provenance, sort_keys=True)),
        )
        temporary.replace(path)
        self.log(
            f"features of {name}: {len(images)} images in {time.perf_counter() - started:.1f} s"
        )
        return ImageSetFeatures(probabilities.astype(np.float32), features.astype(np.float32))


# ------------------------------------------------------------------------ the concepts


def split_known_unknowns(
    sources: dict[str, np.ndarray], config: EvaluationConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Evaluation images per concept and known-unknown training images per concept.

    ``"<concept>_train"`` entries are training parts as given; a concept without one
    gives its first ``count`` images (after a seeded permutation) to training.
    """
    evaluation, training = {}, {}
    for name, images in sources.items():
        if not name.endswith("_train"):
            evaluation[name] = _check_images(images, f"known_unknown_sources[{name!r}]")
    for concept, count in config.train_counts().items():
        given = sources.get(f"{concept}_train")
        if given is not None:
            training[concept] = _check_images(given, f"known_unknown_sources['{concept}_train']")
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


# -------------------------------------------------------------------------- results


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


def _mean_std(values: Sequence[float]) -> dict[str, float | None]:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": None, "std": None}
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {"mean": float(finite.mean()), "std": std}


def _aggregate(per_member: list[dict[str, float]]) -> dict[str, dict]:
    return {key: _mean_std([metrics[key] for metrics in per_member]) for key in METRIC_KEYS}


# ------------------------------------------------------------------------ per member


@dataclass
class _MemberData:
    """One member's features on its splits and on every concept (member axis removed)."""

    validation: np.ndarray  # (N_val, 37)
    validation_correct: np.ndarray  # (N_val,) bool
    test: np.ndarray  # (N_test, 37)
    test_correct: np.ndarray  # (N_test,) bool
    concepts: dict[str, np.ndarray]  # concept -> (N_c, 37)
    known_unknowns: dict[str, np.ndarray]  # concept -> training part (N, 37)


def _comparisons(
    test_confidence: np.ndarray,
    test_correct: np.ndarray,
    concept_confidences: dict[str, np.ndarray],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Comparison name -> (confidence, positive) with positive = correct / in-distribution."""
    comparisons = {CORRECT_VS_WRONG: (test_confidence, test_correct)}
    positives = test_confidence[test_correct]
    for concept, confidence in concept_confidences.items():
        comparisons[concept] = (
            np.concatenate([positives, confidence]),
            np.r_[np.ones(len(positives), bool), np.zeros(len(confidence), bool)],
        )
    return comparisons


def _evaluate(
    test_confidence: np.ndarray,
    test_correct: np.ndarray,
    concept_confidences: dict[str, np.ndarray],
) -> dict[str, dict[str, float]]:
    with warnings.catch_warnings():
        # a member without wrong test predictions: nan, counted once in the report
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return {
            comparison: threshold_metrics(confidence, positive)
            for comparison, (confidence, positive) in _comparisons(
                test_confidence, test_correct, concept_confidences
            ).items()
        }


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
    from training.evaluation.report import compute_claims, write_report

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
    cache = FeatureCache(cache_dir, feature_extractor, log)
    concepts, known_unknown_images = split_known_unknowns(known_unknown_sources, config)
    num_members = len(members)

    # ---- features of every member on every image set (cached)
    def features_of(name: str, images: np.ndarray) -> ImageSetFeatures:
        result = cache.get(name, images)
        if result.features.shape[0] != num_members:
            raise ValueError(
                f"The feature extractor yields {result.features.shape[0]} members for "
                f"{num_members} MemberInputs; each member's graph_paths must give one member"
            )
        return result

    concept_features = {name: features_of(name, images) for name, images in concepts.items()}
    train_features = {
        name: features_of(f"{name} (known-unknown training)", images)
        for name, images in known_unknown_images.items()
    }
    validation_features = [
        features_of(f"member {k} validation", member.validation_images)
        for k, member in enumerate(members)
    ]
    test_features = [
        features_of(f"member {k} test", member.test_images) for k, member in enumerate(members)
    ]

    member_data = []
    for k, member in enumerate(members):
        validation, test = validation_features[k], test_features[k]
        member_data.append(
            _MemberData(
                validation=validation.features[k].astype(np.float64),
                validation_correct=validation.probabilities[k].argmax(1)
                == member.validation_labels,
                test=test.features[k].astype(np.float64),
                test_correct=test.probabilities[k].argmax(1) == member.test_labels,
                concepts={c: f.features[k].astype(np.float64) for c, f in concept_features.items()},
                known_unknowns={
                    c: f.features[k].astype(np.float64) for c, f in train_features.items()
                },
            )
        )
    names = feature_names()

    # ---- (a) single metrics, (b) meta classifiers, (d) baselines: per member
    per_score: dict[tuple[str, str], list[dict[str, dict[str, float]]]] = {}
    directions: dict[str, list[int]] = {name: [] for name in names}
    plot = {"member": config.plot_member, "groups": {}, "curves": {}, "reliability": []}

    def add(kind: str, score: str, evaluation: dict[str, dict[str, float]]) -> None:
        per_score.setdefault((kind, score), []).append(evaluation)

    for k, data in enumerate(member_data):
        log(f"member {k}: thresholds, meta classifiers, baselines")
        confidences: dict[tuple[str, str], tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        for j, name in enumerate(names):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                direction = fit_direction(data.validation[:, j], data.validation_correct)
            directions[name].append(direction)
            confidences[("feature", name)] = (
                direction * data.test[:, j],
                {c: direction * values[:, j] for c, values in data.concepts.items()},
            )
        if data.validation_correct.all() or not data.validation_correct.any():
            warnings.warn(
                f"member {k}: the validation split has only one class; meta classifiers skipped",
                UndefinedMetricWarning,
                stacklevel=2,
            )
        else:
            for name in META_CLASSIFIER_NAMES:
                model = fit_meta_classifier(
                    name, data.validation, data.validation_correct, config.meta, members[k].seed
                )
                confidences[("meta_classifier", name)] = (
                    positive_probability(model, data.test),
                    {c: positive_probability(model, v) for c, v in data.concepts.items()},
                )

        ensemble_test = baseline_scores.ensemble_confidences(test_features[k].probabilities)
        ensemble_concepts = {
            c: baseline_scores.ensemble_confidences(f.probabilities)
            for c, f in concept_features.items()
        }
        member_test = baseline_scores.member_confidences(
            members[k].model, members[k].test_images, config.baselines
        )
        member_concepts = {
            c: baseline_scores.member_confidences(members[k].model, images, config.baselines)
            for c, images in concepts.items()
        }
        for name in baseline_scores.BASELINE_NAMES:
            if name in ensemble_test:
                test_value, concept_values = ensemble_test[name], ensemble_concepts
            else:
                test_value, concept_values = member_test[name], member_concepts
            confidences[("baseline", name)] = (
                test_value,
                {c: values[name] for c, values in concept_values.items()},
            )

        for (kind, score), (test_confidence, concept_confidence) in confidences.items():
            add(kind, score, _evaluate(test_confidence, data.test_correct, concept_confidence))

        if k == config.plot_member:
            plot["groups"] = {
                "mnist correct": data.test[data.test_correct],
                "mnist wrong": data.test[~data.test_correct],
                **data.concepts,
            }
            shown = [("feature", "entropy"), ("feature", "softmax_baseline")]
            shown += [("feature", "euclidean_norm@all"), ("feature", "min@all")]
            shown += [("meta_classifier", "lasso"), ("meta_classifier", "neural_net")]
            shown += [("baseline", "energy")]
            curves: dict[str, dict] = {}
            for kind, score in shown:
                if (kind, score) not in confidences:
                    continue
                test_confidence, concept_confidence = confidences[(kind, score)]
                pairs = _comparisons(test_confidence, data.test_correct, concept_confidence)
                for comparison, pair in pairs.items():
                    curves.setdefault(comparison, {})[score] = pair
            plot["curves"] = curves

    records = [
        {"score": score, "kind": kind, "concept": comparison, **_aggregate(evaluations_at)}
        for (kind, score), evaluations in per_score.items()
        for comparison in [CORRECT_VS_WRONG, *concepts]
        for evaluations_at in [[evaluation[comparison] for evaluation in evaluations]]
    ]

    # ---- (c) known unknowns
    log("known-unknowns study")
    known_unknown_rows = []
    available_sets = [
        (set_name, added)
        for set_name, added in config.known_unknown_sets
        if all(concept in train_features for concept in added)
    ]
    for set_name, added in config.known_unknown_sets:
        if (set_name, added) not in available_sets:
            warnings.warn(
                f"known-unknowns training set {set_name!r} skipped: no training images for "
                f"{[c for c in added if c not in train_features]}",
                stacklevel=2,
            )
    for model_name in config.known_unknown_models:
        for set_name, added in available_sets:
            evaluations = []
            for k, data in enumerate(member_data):
                if data.validation_correct.all() or not data.validation_correct.any():
                    continue
                features = np.concatenate(
                    [data.validation, *[data.known_unknowns[c] for c in added]]
                )
                labels = np.concatenate(
                    [data.validation_correct, np.zeros(len(features) - len(data.validation), bool)]
                )
                model = fit_meta_classifier(
                    model_name, features, labels, config.meta, members[k].seed
                )
                evaluations.append(
                    _evaluate(
                        positive_probability(model, data.test),
                        data.test_correct,
                        {c: positive_probability(model, v) for c, v in data.concepts.items()},
                    )
                )
            for comparison in [CORRECT_VS_WRONG, *concepts]:
                known_unknown_rows.append(
                    {
                        "model": model_name,
                        "training_set": set_name,
                        "concept": comparison,
                        "seen": comparison in added,
                        **_aggregate([evaluation[comparison] for evaluation in evaluations]),
                    }
                )

    # ---- the report
    member_rows = []
    for k, (member, data) in enumerate(zip(members, member_data, strict=True)):
        member_rows.append(
            {
                "member": k,
                "seed": member.seed,
                "validation_images": len(member.validation_images),
                "test_images": len(member.test_images),
                "validation_accuracy": float(data.validation_correct.mean()),
                "test_accuracy": float(data.test_correct.mean()),
                "validation_wrong": int((~data.validation_correct).sum()),
                "test_wrong": int((~data.test_correct).sum()),
                "directions": {name: directions[name][k] for name in names},
            }
        )
    report: dict[str, Any] = {
        "records": records,
        "known_unknowns": known_unknown_rows,
        "meta_classifiers": _describe_meta(config),
        "baselines": _describe_baselines(config),
        "claims": [],
        "members": member_rows,
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


def _describe_meta(config: EvaluationConfig) -> list[dict]:
    meta = config.meta
    descriptions = {
        "glm": ("logistic regression without penalty (GLM, logit link)", {}),
        "lasso": ("L1-penalised logistic regression", {"C": meta.lasso_c}),
        "ridge": ("L2-penalised logistic regression", {"C": meta.ridge_c}),
        "elastic_net": (
            "logistic regression, elastic-net penalty",
            {"C": meta.elastic_net_c, "l1_ratio": meta.elastic_net_l1_ratio},
        ),
        "neural_net": (
            "one hidden ReLU layer with weight decay (MLPClassifier)",
            {"hidden_units": meta.hidden_units, "weight_decay": meta.weight_decay},
        ),
    }
    return [
        {
            "name": name,
            "description": description,
            "hyperparameters": hyperparameters,
            "input": "one member's feature vector, structurally zero features dropped, "
            "standardized",
            "fitted_on": "the member's validation split, label 1 = correct prediction",
            "score": "p(correct) = predict_proba(X)[:, 1]; larger = more confident",
        }
        for name, (description, hyperparameters) in descriptions.items()
    ]


def _describe_baselines(config: EvaluationConfig) -> list[dict]:
    passes = config.baselines.mc_dropout_passes
    return [
        {
            "name": "ensemble_entropy",
            "score": "-H(mean_k softmax_k)",
            "reference": "Lakshminarayanan et al. 2017",
            "caveat": "member k's test images were training images of other members",
        },
        {
            "name": "ensemble_mutual_information",
            "score": "-(H(mean_k p_k) - mean_k H(p_k))",
            "reference": "Lakshminarayanan et al. 2017; Houlsby et al. 2011",
            "caveat": "member k's test images were training images of other members",
        },
        {
            "name": "mc_dropout_entropy",
            "score": f"-H(mean over {passes} dropout passes of softmax)",
            "reference": "Gal and Ghahramani 2016",
        },
        {
            "name": "energy",
            "score": "logsumexp(logits) (the negated energy)",
            "reference": "Liu et al. 2020",
        },
        {
            "name": "gradnorm",
            "score": "|| d KL(uniform || softmax) / d W_dense ||_1",
            "reference": "Huang et al. 2021",
        },
    ]
