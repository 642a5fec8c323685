"""The fitted service heads evaluated in plain numpy, giving scikit-learn's floats bit for bit.

Why: a one-image request spends more time in the two heads' ``predict_proba`` than in
the five members' graphs (3.7 ms against 2.6 ms, default bundle, one thread), and almost
none of it computes anything: scikit-learn validates its input, resolves tags and
dispatches through the calibrator, the soft vote, the pipeline and the column selection
on every call, and the boosted trees run 200 single-tree predicts. The compiled forms
below do the arithmetic only: 0.08 ms for both. A converter library was tried first:
skl2onnx 1.20 converted the calibrated logistic head wrongly (|dp| up to 0.27) and
refused the soft vote (``flatten_transform``), so these few forms are written here, and
held to the estimators (``tests/test_compiled_heads.py``, and :func:`compiled_or_estimator`
on every load).

Supported: what the build writes (``training.evaluation.service_level.fit_calibrated``):
a binary ``CalibratedClassifierCV`` (sigmoid or isotonic, one calibrated copy or one per
fold) of either a ``Pipeline`` [``ColumnTransformer`` with one passthrough column list,
``StandardScaler``, ``LogisticRegression`` | ``MLPClassifier`` |
``HistGradientBoostingClassifier``] or an unweighted soft ``VotingClassifier`` of such
pipelines. Anything else raises :class:`UnsupportedHead`.

Faithfulness: each form replays scikit-learn's operations in scikit-learn's order: the
same column selection, ``(x - mean) / scale``, the same matrix products, SciPy's
``expit``, the trees' sum taken sequentially from the baseline (``np.cumsum``, never a
pairwise sum), the calibrated copies summed and divided as ``CalibratedClassifierCV``
does. So the probabilities are the same floats, not merely close ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

__all__ = ["CompiledHead", "UnsupportedHead", "compile_head", "compiled_or_estimator"]

log = logging.getLogger(__name__)

#: Rows the load-time check compares the compiled head and the estimator on.
PROBE_ROWS = 256


class UnsupportedHead(ValueError):
    """The estimator has a structure this module has no compiled form for."""


def _activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """scikit-learn's in-place hidden activations (``neural_network._base.ACTIVATIONS``)."""
    if name == "relu":
        return lambda x: np.maximum(x, 0, out=x)
    if name == "tanh":
        return lambda x: np.tanh(x, out=x)
    if name == "logistic":
        return lambda x: expit(x, out=x)
    if name == "identity":
        return lambda x: x
    raise UnsupportedHead(f"MLP activation {name!r}")


@dataclass(frozen=True)
class _Logistic:
    """Binary ``LogisticRegression``: ``expit(x @ coef.T + intercept)``."""

    coef_t: np.ndarray  # (F, 1), the transposed view scikit-learn multiplies by
    intercept: np.ndarray  # (1,)

    def decision(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.coef_t + self.intercept).reshape(-1)  # (B,)

    def positive(self, x: np.ndarray) -> np.ndarray:
        return expit(self.decision(x))


@dataclass(frozen=True)
class _Perceptron:
    """Binary ``MLPClassifier``: its forward pass, logistic output (no decision function)."""

    coefs: tuple[np.ndarray, ...]
    intercepts: tuple[np.ndarray, ...]
    hidden: Callable[[np.ndarray], np.ndarray]

    def positive(self, x: np.ndarray) -> np.ndarray:
        activation = x
        for i, (coef, intercept) in enumerate(zip(self.coefs, self.intercepts, strict=True)):
            activation = activation @ coef
            activation += intercept
            if i != len(self.coefs) - 1:
                self.hidden(activation)
        return expit(activation, out=activation).ravel()  # (B,)


@dataclass(frozen=True)
class _Trees:
    """Binary ``HistGradientBoostingClassifier`` on numeric features.

    All trees' nodes in one table (child indices offset into it; a leaf points at itself),
    walked for every (image, tree) pair at once, one level per step. The trees are walked
    shallowest first, so that level ``d`` touches only the trees deeper than ``d`` (the
    default p_ood head's trees are 5 to 13 levels deep), and their leaf values are put
    back in fitting order before they are summed.
    """

    feature: np.ndarray  # (N,) intp, 0 at leaves
    threshold: np.ndarray  # (N,) float64
    missing_right: np.ndarray  # (N,) bool: where a NaN goes
    children: np.ndarray  # (2N,) intp: left child at 2n, right child at 2n + 1
    value: np.ndarray  # (N,) float64
    roots: np.ndarray  # (T,) intp, shallowest tree first
    deeper: tuple[int, ...]  # deeper[d]: the first of the walk-ordered trees deeper than d
    fitting_order: np.ndarray  # (T,) intp: walk position of each tree, in fitting order
    baseline: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        rows, width = x.shape
        flat, start = x.ravel(), (np.arange(rows) * width)[:, None]  # (B*F,), (B, 1)
        missing = np.isnan(flat).any()
        node = np.repeat(self.roots[None, :], rows, axis=0)  # (B, T)
        for first in self.deeper:
            walking = node[:, first:]  # (B, T'), the trees not yet at a leaf
            values = flat[start + self.feature[walking]]  # (B, T')
            go_right = values > self.threshold[walking]
            if missing:  # NaN compares False both ways: send it where training sent it
                go_right = np.where(np.isnan(values), self.missing_right[walking], go_right)
            node[:, first:] = self.children[2 * walking + go_right]
        terms = np.empty((rows, len(self.roots) + 1))  # (B, 1 + T)
        terms[:, 0] = self.baseline
        terms[:, 1:] = self.value[node[:, self.fitting_order]]
        return np.cumsum(terms, axis=1)[:, -1]  # baseline + tree 1 + tree 2 + ..., in order

    def positive(self, x: np.ndarray) -> np.ndarray:
        return expit(self.decision(x))


def _trees(model) -> _Trees:
    from sklearn._loss.loss import HalfBinomialLoss

    if model.n_trees_per_iteration_ != 1 or not isinstance(model._loss, HalfBinomialLoss):
        raise UnsupportedHead("boosted trees that are not one binary tree per iteration")
    if model.is_categorical_ is not None and np.any(model.is_categorical_):
        raise UnsupportedHead("boosted trees with categorical features")
    tables = [predictor.nodes for (predictor,) in model._predictors]
    offsets = np.cumsum([0] + [len(nodes) for nodes in tables[:-1]])
    nodes = np.concatenate(tables)
    offset = np.repeat(offsets, [len(t) for t in tables])
    own = np.arange(len(nodes))
    leaf = nodes["is_leaf"].astype(bool)
    if np.any(nodes["is_categorical"][~leaf]):
        raise UnsupportedHead("boosted trees with categorical splits")
    depths = np.array([int(t["depth"].max()) for t in tables])
    walk = np.argsort(depths, kind="stable")  # walk position -> tree
    children = np.stack(
        [
            np.where(leaf, own, nodes["left"].astype(np.intp) + offset),
            np.where(leaf, own, nodes["right"].astype(np.intp) + offset),
        ],
        axis=1,
    )  # (N, 2)
    return _Trees(
        feature=np.where(leaf, 0, nodes["feature_idx"]).astype(np.intp),
        threshold=nodes["num_threshold"].astype(np.float64),
        missing_right=~nodes["missing_go_to_left"].astype(bool),
        children=children.reshape(-1),
        value=nodes["value"].astype(np.float64),
        roots=offsets[walk].astype(np.intp),
        deeper=tuple(
            int(np.searchsorted(depths[walk], level, side="right"))
            for level in range(int(depths.max()))
        ),
        fitting_order=np.argsort(walk).astype(np.intp),
        baseline=float(model._baseline_prediction.reshape(-1)[0]),
    )


def _final(model):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    if len(model.classes_) != 2:
        raise UnsupportedHead(f"{type(model).__name__} with {len(model.classes_)} classes")
    if type(model) is LogisticRegression:
        return _Logistic(coef_t=model.coef_.T, intercept=model.intercept_)
    if type(model) is MLPClassifier:
        if model.out_activation_ != "logistic":
            raise UnsupportedHead(f"MLP output {model.out_activation_!r}")
        return _Perceptron(
            coefs=tuple(model.coefs_),
            intercepts=tuple(model.intercepts_),
            hidden=_activation(model.activation),
        )
    if type(model) is HistGradientBoostingClassifier:
        return _trees(model)
    raise UnsupportedHead(f"a pipeline ending in {type(model).__name__}")


@dataclass(frozen=True)
class _Pipeline:
    """Columns, standardized, then a classifier."""

    columns: np.ndarray  # (F,) intp
    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    final: _Logistic | _Perceptron | _Trees

    def _standardized(self, x: np.ndarray) -> np.ndarray:
        selected = x[:, self.columns]
        selected -= self.mean
        selected /= self.scale
        return selected

    def calibrator_input(self, x: np.ndarray) -> np.ndarray:
        """What ``CalibratedClassifierCV`` maps: the decision function where the
        classifier has one, else its probability of the positive class."""
        final, standardized = self.final, self._standardized(x)
        if isinstance(final, _Perceptron):
            return final.positive(standardized)
        return final.decision(standardized)

    def positive(self, x: np.ndarray) -> np.ndarray:
        return self.final.positive(self._standardized(x))


def _pipeline(estimator) -> _Pipeline:
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    if type(estimator) is not Pipeline or len(estimator.steps) != 3:
        raise UnsupportedHead(f"{type(estimator).__name__} is not a three-step pipeline")
    (_, select), (_, scaler), (_, final) = estimator.steps
    if type(select) is not ColumnTransformer or type(scaler) is not StandardScaler:
        raise UnsupportedHead("a pipeline that does not select columns, then standardize")
    parts = [part for part in select.transformers_ if part[0] != "remainder"]
    remainder = [part[1] for part in select.transformers_ if part[0] == "remainder"]
    if len(parts) != 1 or any(r != "drop" for r in remainder):
        raise UnsupportedHead("a column selection that is not one passthrough list")
    (_, passthrough, columns) = parts[0]
    identity = type(passthrough) is FunctionTransformer and passthrough.func is None
    if not (passthrough == "passthrough" or identity):
        raise UnsupportedHead("a column selection that transforms its columns")
    if not (scaler.with_mean and scaler.with_std):
        raise UnsupportedHead("a scaler without centring or scaling")
    return _Pipeline(
        columns=np.asarray(columns, dtype=np.intp),
        mean=scaler.mean_,
        scale=scaler.scale_,
        final=_final(final),
    )


@dataclass(frozen=True)
class _SoftVote:
    """Unweighted soft ``VotingClassifier``: the mean of its parts' probabilities."""

    parts: tuple[_Pipeline, ...]

    def calibrator_input(self, x: np.ndarray) -> np.ndarray:
        """A voting classifier has no decision function: its mean probability."""
        return np.mean([part.positive(x) for part in self.parts], axis=0)


def _response(estimator) -> _Pipeline | _SoftVote:
    from sklearn.ensemble import VotingClassifier

    if type(estimator) is VotingClassifier:
        if estimator.voting != "soft" or estimator.weights is not None:
            raise UnsupportedHead("a voting classifier that is not an unweighted soft vote")
        return _SoftVote(parts=tuple(_pipeline(part) for part in estimator.estimators_))
    return _pipeline(estimator)


def _calibration_map(calibrator) -> Callable[[np.ndarray], np.ndarray]:
    from sklearn.calibration import _SigmoidCalibration
    from sklearn.isotonic import IsotonicRegression

    if type(calibrator) is _SigmoidCalibration:
        a, b = calibrator.a_, calibrator.b_
        return lambda t: expit(-(a * t + b))
    if type(calibrator) is IsotonicRegression:
        return calibrator.predict  # a 1-d interpolation: little to save, nothing to risk
    raise UnsupportedHead(f"calibrator {type(calibrator).__name__}")


@dataclass(frozen=True)
class CompiledHead:
    """A calibrated binary head; :meth:`predict_proba` as the estimator's."""

    copies: tuple[tuple[_Pipeline | _SoftVote, Callable[[np.ndarray], np.ndarray]], ...]
    num_inputs: int

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        """``(B, 2)`` class probabilities of float64 head inputs ``(B, num_inputs)``."""
        inputs = np.asarray(inputs, dtype=np.float64)
        if inputs.ndim != 2 or inputs.shape[1] != self.num_inputs:
            raise ValueError(f"head inputs must be (B, {self.num_inputs}), got {inputs.shape}")
        total = np.zeros((len(inputs), 2))
        for response, calibration in self.copies:
            positive = calibration(response.calibrator_input(inputs))
            total[:, 1] += positive
            total[:, 0] += 1.0 - positive
        total /= len(self.copies)
        return total

    def probe_rows(self, count: int = PROBE_ROWS, seed: int = 0) -> np.ndarray:
        """``(count, num_inputs)`` rows spread as the fitting data was (each standardized
        column drawn from N(0, 1)), for comparing this form with its estimator."""
        rows = np.zeros((count, self.num_inputs))
        rng = np.random.default_rng(seed)
        for response, _ in self.copies:
            pipelines = response.parts if isinstance(response, _SoftVote) else (response,)
            for pipeline in pipelines:
                draws = rng.standard_normal((count, len(pipeline.columns)))
                rows[:, pipeline.columns] = pipeline.mean + pipeline.scale * draws
        return rows


def compile_head(estimator) -> CompiledHead:
    """The compiled form of a fitted head; :class:`UnsupportedHead` if it has none."""
    from sklearn.calibration import CalibratedClassifierCV

    if type(estimator) is not CalibratedClassifierCV:
        raise UnsupportedHead(f"{type(estimator).__name__} is not a CalibratedClassifierCV")
    if len(estimator.classes_) != 2:
        raise UnsupportedHead(f"a head with {len(estimator.classes_)} classes")
    copies = []
    for copy in estimator.calibrated_classifiers_:
        (calibrator,) = copy.calibrators  # binary: one map, of the positive class
        copies.append((_response(copy.estimator), _calibration_map(calibrator)))
    return CompiledHead(copies=tuple(copies), num_inputs=int(estimator.n_features_in_))


def compiled_or_estimator(estimator, name: str):
    """The compiled head when it gives the estimator's probabilities exactly on its
    :meth:`CompiledHead.probe_rows`; else the estimator, with a warning that says why (a
    head this module does not know, or another scikit-learn whose arithmetic moved)."""
    try:
        compiled = compile_head(estimator)
    except (UnsupportedHead, AttributeError, TypeError, ValueError) as error:
        log.warning("%s head: no compiled form (%s); scikit-learn evaluates it", name, error)
        return estimator
    rows = compiled.probe_rows()
    if not np.array_equal(compiled.predict_proba(rows), estimator.predict_proba(rows)):
        log.warning(
            "%s head: the compiled form differs from scikit-learn's on probe rows; "
            "scikit-learn evaluates it",
            name,
        )
        return estimator
    return compiled
