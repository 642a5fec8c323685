"""Every score of the paper-level report behind one interface, and the registry of them.

In the spirit of pytorch-ood's detectors, a :class:`Score` has

- ``name`` and ``kind`` (the report's group: ``feature``, ``meta_classifier`` or
  ``baseline``);
- ``fit(inputs, correct)``: learn what the score needs from one member's validation
  split (a no-op for scores without fitted state);
- ``confidence(inputs)``: shape ``(N,)``, oriented **larger = more likely correct /
  more in-distribution**, the orientation of every number in the report;
- ``describe()``: what the report writes about it, kept next to the code that computes
  it so that the two cannot drift apart.

:func:`paper_scores` lists, for one member, the 37 single features, the paper's five
meta classifiers and the baselines, in report order; the protocol
(:func:`training.evaluation.protocol.run_evaluation`) fits and evaluates whatever it
lists. The served scores of the ensemble (ViM, KNN, Mahalanobis, ...) need no torch and
live in :mod:`scoring.scores`; the service-level evaluation measures them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from scoring import scores as served
from scoring.features import feature_names
from training.evaluation.baselines import (
    BaselineConfig,
    gradnorm_confidence,
    logits_and_last_inputs,
    mc_dropout_probabilities,
)
from training.evaluation.meta import (
    META_CLASSIFIER_NAMES,
    MetaConfig,
    fit_meta_classifier,
    make_meta_classifier,
    positive_probability,
)
from training.evaluation.metrics import UndefinedMetricWarning, fit_direction

__all__ = [
    "BASELINE_NAMES",
    "EnsembleEntropy",
    "EnsembleMutualInformation",
    "Energy",
    "FeatureThreshold",
    "GradNorm",
    "McDropoutEntropy",
    "MetaClassifierScore",
    "Score",
    "ScoreInputs",
    "paper_scores",
]


@dataclass
class ScoreInputs:
    """What a score may read about one image set, seen from one member.

    Each score reads only what it needs: the meta classifiers the feature vector, the
    deep-ensemble scores every member's probabilities, the torch baselines the images
    and the member's model. A field a score needs but was not given raises a clear error.
    """

    features: np.ndarray  # (N, 37) float64: this member's feature vector
    member_probabilities: np.ndarray | None = None  # (M, N, 10): every member's softmax
    images: np.ndarray | None = None  # (N, 28, 28) uint8
    model: Any = None  # this member's PaperCNN in eval mode
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)

    def require(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this score needs ScoreInputs.{name}, which was not given")
        return value

    def derived(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per image set (e.g. a forward pass two baselines share)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]


class Score(Protocol):
    """One score of the report: fitted on a member's validation split, then evaluated."""

    name: str
    kind: str  # report group: "feature", "meta_classifier" or "baseline"
    needs_both_classes: bool  # fit needs correct and wrong validation predictions

    def fit(self, inputs: ScoreInputs, correct: np.ndarray) -> None:
        """Fit on validation inputs; ``correct`` (N,) bool is the positive label."""

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        """``(N,)`` float, larger = more likely correct / more in-distribution."""

    def describe(self) -> dict[str, Any]:
        """What the report says about this score."""


class _Unfitted:
    """Scores without fitted state: ``fit`` does nothing."""

    needs_both_classes: ClassVar[bool] = False

    def fit(self, inputs: ScoreInputs, correct: np.ndarray) -> None:
        return None


# --------------------------------------------------------------------- single features


class FeatureThreshold:
    """One feature of the vector used as it is, its sign fixed on validation data.

    The direction (+1 or -1) is the sign that gives a larger value to correct
    predictions on the member's validation split (:func:`fit_direction`); test data is
    then scored unchanged (single-metric thresholding, DESIGN.md section 4).
    """

    kind = "feature"
    needs_both_classes = False

    def __init__(self, index: int, name: str) -> None:
        self.index, self.name = index, name
        self.direction = 1

    def fit(self, inputs: ScoreInputs, correct: np.ndarray) -> None:
        with warnings.catch_warnings():
            # one class only: the direction stays +1, and the report counts the nan
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            self.direction = fit_direction(inputs.features[:, self.index], correct)

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        return self.direction * inputs.features[:, self.index]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": "direction * feature; the direction is fixed on the member's validation split",
        }


# --------------------------------------------------------------------- meta classifiers

_META_DESCRIPTIONS: dict[str, str] = {
    "glm": "logistic regression without penalty (GLM, logit link)",
    "lasso": "L1-penalised logistic regression",
    "ridge": "L2-penalised logistic regression",
    "elastic_net": "logistic regression, elastic-net penalty",
    "neural_net": "one hidden ReLU layer with weight decay (MLPClassifier)",
}


#: What each preprocessing step of a meta-classifier pipeline does, in the report's words.
_INPUT_STEPS: dict[str, str] = {
    "select": "structurally zero features dropped, entropy, norms, minima and maxima on a "
    "log scale",
    "standardize": "standardized",
    "compress_tails": "tails compressed with arcsinh",
    "restandardize": "standardized again",
}


class MetaClassifierScore:
    """One of the paper's meta classifiers on a member's whole feature vector.

    The pipeline (:func:`training.evaluation.meta.make_meta_classifier`) drops the
    structurally zero features, puts entropy, norms, minima and maxima on a log scale,
    standardizes, compresses the tails with arcsinh and standardizes again (when
    ``compress_tails``); label 1 = correct prediction, so ``p(correct)`` is the
    confidence.
    """

    kind = "meta_classifier"
    needs_both_classes = True

    def __init__(self, name: str, config: MetaConfig, seed: int) -> None:
        self.name, self.config, self.seed = name, config, seed
        self.model: Any = None

    def fit(self, inputs: ScoreInputs, correct: np.ndarray) -> None:
        self.model = fit_meta_classifier(
            self.name, inputs.features, correct, self.config, self.seed
        )

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"meta classifier {self.name!r}: confidence() before fit()")
        return positive_probability(self.model, inputs.features)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": _META_DESCRIPTIONS[self.name],
            "hyperparameters": self._hyperparameters(),
            "input": "one member's feature vector: " + self._input_steps(),
            "fitted_on": "the member's validation split, label 1 = correct prediction",
            "score": "p(correct) = predict_proba(X)[:, 1]; larger = more confident",
        }

    def _input_steps(self) -> str:
        """The pipeline's own steps before the classifier, in words (so the report says
        what the code does)."""
        pipeline = make_meta_classifier(self.name, self.config, self.seed)
        return ", ".join(_INPUT_STEPS[name] for name, _ in pipeline.steps[:-1])

    def _hyperparameters(self) -> dict[str, float]:
        config = self.config
        return {
            "glm": {},
            "lasso": {"C": config.lasso_c},
            "ridge": {"C": config.ridge_c},
            "elastic_net": {"C": config.elastic_net_c, "l1_ratio": config.elastic_net_l1_ratio},
            "neural_net": {
                "hidden_units": config.hidden_units,
                "weight_decay": config.weight_decay,
            },
        }[self.name]


# ---------------------------------------------------------------------------- baselines


class EnsembleEntropy(_Unfitted):
    """Deep ensemble (Lakshminarayanan et al. 2017): ``-H(mean_k softmax_k)``."""

    name, kind = "ensemble_entropy", "baseline"

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        return -served.predictive_entropy(inputs.require("member_probabilities"))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": "-H(mean_k softmax_k)",
            "reference": "Lakshminarayanan et al. 2017",
        }


class EnsembleMutualInformation(_Unfitted):
    """The ensemble's epistemic part, ``-(H(mean_k p_k) - mean_k H(p_k))`` (BALD)."""

    name, kind = "ensemble_mutual_information", "baseline"

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        return -served.mutual_information(inputs.require("member_probabilities"))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": "-(H(mean_k p_k) - mean_k H(p_k))",
            "reference": "Lakshminarayanan et al. 2017; Houlsby et al. 2011",
        }


class McDropoutEntropy(_Unfitted):
    """MC dropout (Gal and Ghahramani 2016): ``-H`` of the mean softmax over ``T``
    stochastic passes with the member's dropout layers active."""

    name, kind = "mc_dropout_entropy", "baseline"

    def __init__(self, config: BaselineConfig) -> None:
        self.config = config

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        config = self.config
        stochastic = mc_dropout_probabilities(  # (T, N, 10)
            inputs.require("model"),
            inputs.require("images"),
            config.mc_dropout_passes,
            config.batch_size,
            config.seed,
        )
        return -served.predictive_entropy(stochastic)

    def describe(self) -> dict[str, Any]:
        passes = self.config.mc_dropout_passes
        return {
            "name": self.name,
            "score": f"-H(mean over {passes} dropout passes of softmax)",
            "reference": "Gal and Ghahramani 2016",
        }


def _last_layer(inputs: ScoreInputs, config: BaselineConfig) -> tuple[np.ndarray, np.ndarray]:
    """The member's logits ``(N, 10)`` and dense-layer inputs ``(N, 784)``, computed once."""
    return inputs.derived(
        "last_layer",
        lambda: logits_and_last_inputs(
            inputs.require("model"), inputs.require("images"), config.batch_size
        ),
    )


class Energy(_Unfitted):
    """Energy score (Liu et al. 2020): ``logsumexp(logits)``, the negated energy."""

    name, kind = "energy", "baseline"

    def __init__(self, config: BaselineConfig) -> None:
        self.config = config

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        logits, _ = _last_layer(inputs, self.config)
        return served.energy(logits)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": "logsumexp(logits) (the negated energy)",
            "reference": "Liu et al. 2020",
        }


class GradNorm(_Unfitted):
    """GradNorm (Huang et al. 2021): the L1 norm of ``d KL(uniform || softmax) / d W``
    over the last layer's weights; larger for in-distribution inputs."""

    name, kind = "gradnorm", "baseline"

    def __init__(self, config: BaselineConfig) -> None:
        self.config = config

    def confidence(self, inputs: ScoreInputs) -> np.ndarray:
        logits, last_inputs = _last_layer(inputs, self.config)
        return gradnorm_confidence(logits, last_inputs)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": "|| d KL(uniform || softmax) / d W_dense ||_1",
            "reference": "Huang et al. 2021",
        }


# ----------------------------------------------------------------------------- registry


def paper_scores(meta: MetaConfig, baselines: BaselineConfig, seed: int) -> list[Score]:
    """Fresh, unfitted scores for one member, in report order.

    The single features (:func:`scoring.features.feature_names`), the paper's meta
    classifiers (:data:`META_CLASSIFIER_NAMES`, seeded with the member's seed) and the
    baselines (:data:`BASELINE_NAMES`).
    """
    scores: list[Score] = [FeatureThreshold(j, name) for j, name in enumerate(feature_names())]
    scores += [MetaClassifierScore(name, meta, seed) for name in META_CLASSIFIER_NAMES]
    return scores + _baselines(baselines)


def _baselines(config: BaselineConfig) -> list[Score]:
    """The baselines, in report order."""
    return [
        EnsembleEntropy(),
        EnsembleMutualInformation(),
        McDropoutEntropy(config),
        Energy(config),
        GradNorm(config),
    ]


#: Every baseline, in report order (the registry's own list).
BASELINE_NAMES: tuple[str, ...] = tuple(score.name for score in _baselines(BaselineConfig()))
