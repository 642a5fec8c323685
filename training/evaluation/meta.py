"""Meta classifiers on the whole feature vector (DESIGN.md sections 3 and 4).

A meta classifier maps one member's feature vector (37 numbers in
:func:`scoring.features.feature_names` order, of which the structurally zero ones are
dropped and the rest standardized) to the probability of the *positive*
class, label 1. In every evaluation table the positive class is "correct prediction
on an in-distribution input", so ``predict_proba(X)[:, 1]`` is ``p(correct)`` and
**larger means more confident**, like every other score of the report.

Each classifier is a plain ``sklearn.pipeline.Pipeline`` (column selection,
``StandardScaler``, then the model): it follows the scikit-learn estimator contract
(``fit``, ``predict_proba``), pickles with joblib and loads without torch or this project
installed, which is what the service needs.

- ``glm`` - logistic regression without a penalty (the paper's GLM with logit link).
- ``lasso`` - L1-penalised logistic regression.
- ``ridge`` - L2-penalised logistic regression.
- ``elastic_net`` - half L1, half L2 (``l1_ratio=0.5``).
- ``neural_net`` - one hidden ReLU layer with weight decay (``MLPClassifier``, whose
  ``alpha`` is the L2 weight decay).

Every hyperparameter is a field of :class:`MetaConfig`; the paper lost its values, so
each is a chosen default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from scoring.meta_inputs import log_magnitude, magnitude_columns, plain_columns

__all__ = [
    "META_CLASSIFIER_NAMES",
    "MetaConfig",
    "make_meta_classifier",
    "fit_meta_classifier",
    "positive_probability",
]

#: The five meta classifiers, in report order.
META_CLASSIFIER_NAMES: tuple[str, ...] = ("glm", "lasso", "ridge", "elastic_net", "neural_net")


@dataclass(frozen=True)
class MetaConfig:
    """Hyperparameters of the meta classifiers; every value is a chosen default.

    ``C`` is scikit-learn's inverse regularization strength: the objective is
    ``C * sum(log loss) + penalty(w)``, so on a validation split of 10,000 samples a
    ``C`` of 0.05 weighs the penalty like a per-sample strength of 2e-3.
    """

    # Chosen default: moderate regularization on standardized features; with ~1% wrong
    # predictions on the validation split a weaker penalty lets the GLM's heavy-tailed
    # features (kurtosis, skewness) dominate, a much stronger one loses the minority class.
    # Chosen default: gradient metrics are heavy-tailed (a few images have norms hundreds
    # of standard deviations out), which lets a linear model be dominated by extremes.
    # arcsinh after standardizing compresses the tails (about log for large values, the
    # identity near 0) while keeping order and sign, so extremes still extrapolate.
    compress_tails: bool = True
    lasso_c: float = 0.05
    ridge_c: float = 0.05
    elastic_net_c: float = 0.05
    # Paper: the elastic net is half L1, half L2.
    elastic_net_l1_ratio: float = 0.5
    # Chosen defaults: lbfgs for the smooth objectives (GLM, ridge); liblinear for the
    # L1 penalty (on heavy-tailed features it is ~100x faster than saga); saga is the
    # only solver with the elastic-net penalty.
    smooth_solver: str = "lbfgs"
    lasso_solver: str = "liblinear"
    elastic_net_solver: str = "saga"
    # Chosen default: enough iterations for saga on 10k x 37 standardized features
    # (about a second); a ConvergenceWarning is still reported, never silenced.
    logistic_max_iter: int = 2_000
    # Chosen default: the unpenalized GLM has no finite optimum when the classes are
    # separable (digits vs noise often are); its iteration cap is its effective stop.
    glm_max_iter: int = 300
    logistic_tol: float = 1e-4
    # Paper: one hidden layer of ReLUs with weight decay; width and decay lost, chosen
    # defaults (64 units are plenty for 37 inputs; alpha is MLPClassifier's L2 weight decay).
    hidden_units: int = 64
    weight_decay: float = 1e-3
    # Chosen defaults: Adam for a fixed 50 epochs (about a second on 10k samples). No
    # early stopping: it watches accuracy on a 10% hold-out, which with ~1% wrong
    # predictions barely moves, and stopped after ~20 epochs before the network had
    # learnt the minority class (AUROC 0.88 instead of 0.98 on a member's test split).
    mlp_solver: str = "adam"
    mlp_learning_rate: float = 1e-3
    mlp_batch_size: int = 256
    mlp_max_iter: int = 50
    mlp_early_stopping: bool = False
    mlp_validation_fraction: float = 0.1
    mlp_patience: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


def make_meta_classifier(name: str, config: MetaConfig | None = None, seed: int = 0) -> Pipeline:
    """An unfitted meta classifier: ``StandardScaler`` followed by the named model.

    Parameters
    ----------
    name : {'glm', 'lasso', 'ridge', 'elastic_net', 'neural_net'}
        Which model.
    config : MetaConfig, default=None
        Hyperparameters; ``MetaConfig()`` when None.
    seed : int, default=0
        ``random_state`` of the stochastic solvers (saga, the network).

    Returns
    -------
    sklearn.pipeline.Pipeline
        Steps ``select`` (log scale for magnitudes, structurally zero features
        dropped), ``standardize``,
        ``compress_tails`` and ``restandardize`` (when ``config.compress_tails``) and
        ``classifier``.
    """
    config = config or MetaConfig()
    if name == "glm":
        model = LogisticRegression(
            C=np.inf,
            solver=config.smooth_solver,
            max_iter=config.glm_max_iter,
            tol=config.logistic_tol,
        )
    elif name == "ridge":
        model = LogisticRegression(
            C=config.ridge_c,
            l1_ratio=0.0,
            solver=config.smooth_solver,
            max_iter=config.logistic_max_iter,
            tol=config.logistic_tol,
        )
    elif name in ("lasso", "elastic_net"):
        model = LogisticRegression(
            C=config.lasso_c if name == "lasso" else config.elastic_net_c,
            l1_ratio=1.0 if name == "lasso" else config.elastic_net_l1_ratio,
            solver=config.lasso_solver if name == "lasso" else config.elastic_net_solver,
            max_iter=config.logistic_max_iter,
            tol=config.logistic_tol,
            random_state=seed,
        )
    elif name == "neural_net":
        model = MLPClassifier(
            hidden_layer_sizes=(config.hidden_units,),
            activation="relu",
            alpha=config.weight_decay,
            solver=config.mlp_solver,
            learning_rate_init=config.mlp_learning_rate,
            batch_size=config.mlp_batch_size,
            max_iter=config.mlp_max_iter,
            early_stopping=config.mlp_early_stopping,
            validation_fraction=config.mlp_validation_fraction,
            n_iter_no_change=config.mlp_patience,
            random_state=seed,
        )
    else:
        raise ValueError(
            f"The 'name' parameter of make_meta_classifier must be one of "
            f"{list(META_CLASSIFIER_NAMES)}, got {name!r}"
        )
    steps = [("select", _feature_selector()), ("standardize", StandardScaler())]
    if config.compress_tails:
        steps += [
            ("compress_tails", FunctionTransformer(np.arcsinh)),
            ("restandardize", StandardScaler()),
        ]
    return Pipeline([*steps, ("classifier", model)])


def _feature_selector() -> ColumnTransformer:
    """Entropy, norms, minima and maxima on a log scale, the rest as they are, and the
    structurally zero features dropped (see :mod:`scoring.meta_inputs`)."""
    return ColumnTransformer(
        [
            ("log_magnitude", FunctionTransformer(log_magnitude), magnitude_columns()),
            ("plain", "passthrough", plain_columns()),
        ]
    )


def _validate_features(features, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(
            f"'features' must have shape (n_samples, n_features), got {features.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError(
            f"'features' must be finite, got {int((~np.isfinite(features)).sum())} "
            "nan or infinite values"
        )
    if labels is None:
        return features, None
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"'labels' has {labels.shape[0]} entries for {features.shape[0]} feature rows"
        )
    present = set(np.unique(labels).tolist())
    if present != {0, 1}:
        raise ValueError(f"'labels' must contain both classes 0 and 1, got {sorted(present)}")
    return features, labels


def fit_meta_classifier(
    name: str, features, labels, config: MetaConfig | None = None, seed: int = 0
) -> Pipeline:
    """Fit one meta classifier; ``labels`` is 1 for the positive class (e.g. correct).

    Parameters
    ----------
    name : str
        One of :data:`META_CLASSIFIER_NAMES`.
    features : array-like of shape (n_samples, n_features)
        Raw (unstandardized) feature vectors; the pipeline standardizes them.
    labels : array-like of shape (n_samples,)
        0/1 or boolean, both classes present.
    config : MetaConfig, default=None
    seed : int, default=0

    Returns
    -------
    sklearn.pipeline.Pipeline
        Fitted; ``classes_`` is ``[0, 1]`` so ``predict_proba(X)[:, 1]`` is the
        probability of label 1.
    """
    features, labels = _validate_features(features, labels)
    pipeline = make_meta_classifier(name, config, seed)
    pipeline.fit(features, labels)
    return pipeline


def positive_probability(estimator, features) -> np.ndarray:
    """``p(label 1)`` of a fitted binary estimator, shape ``(n_samples,)``."""
    features, _ = _validate_features(features)
    classes = list(estimator.classes_)
    if 1 not in classes:
        raise ValueError(f"The estimator was not fitted with label 1, its classes are {classes}")
    return estimator.predict_proba(features)[:, classes.index(1)]
