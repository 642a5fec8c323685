"""Every uncertainty score the bundle computes, in numpy, each oriented as a confidence.

Direction: **larger = more in-distribution / more likely correct**, for every score here,
as in pytorch-ood's convention turned around (its detectors return outlier scores). The
maths of each score lives in one pure function whose docstring gives the formula and the
paper; DESIGN.md section 3 defines them.

Softmax and ensemble scores take member probabilities ``(M, B, 10)``; feature-space
scores take one member's penultimate activations ``h`` ``(B, 784)`` (the dense layer's
input), its channel statistics ``(B, 64)`` (each channel's mean and standard deviation
over the pixels of the pooled conv1 and conv2 activations) and logits ``(B, 10)``, with
statistics fitted on that member's training images
(:class:`FeatureSpaceStatistics`, stored in the bundle). :func:`ensemble_scores` turns an
engine output into every served score by name (``scores`` of the HTTP contract).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

__all__ = [
    "DISTANCE_SCORE_NAMES",
    "ENSEMBLE_SCORE_NAMES",
    "FEATURE_SPACE_SCORE_NAMES",
    "FeatureSpaceConfig",
    "FeatureSpaceStatistics",
    "SCORE_DESCRIPTIONS",
    "disagreement",
    "energy",
    "ensemble_scores",
    "entropy",
    "knn_distance",
    "mahalanobis_distance",
    "MahalanobisForm",
    "max_logit",
    "member_feature_space_scores",
    "mutual_information",
    "predictive_entropy",
    "vim_virtual_logit",
]

_LOG_FLOOR = 1e-30


# ----------------------------------------------------------------- softmax and ensemble


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Natural-log entropy ``H = -sum_i p_i log p_i`` over the last axis (0 log 0 = 0)."""
    p = np.asarray(probabilities, dtype=np.float64)
    return -(p * np.log(np.clip(p, _LOG_FLOOR, 1.0))).sum(axis=-1)


def predictive_entropy(member_probabilities: np.ndarray) -> np.ndarray:
    """Entropy of the members' mean softmax: ``(M, B, C)`` -> ``(B,)`` (Lakshminarayanan 2017)."""
    return entropy(np.asarray(member_probabilities, dtype=np.float64).mean(axis=0))


def mutual_information(member_probabilities: np.ndarray) -> np.ndarray:
    """Predictive entropy minus the mean member entropy: ``(M, B, C)`` -> ``(B,)``.

    The members' disagreement in information units (BALD, Houlsby et al. 2011); never
    negative in exact arithmetic, clipped at 0 against rounding.
    """
    member_probabilities = np.asarray(member_probabilities, dtype=np.float64)
    mean_entropy = entropy(member_probabilities).mean(axis=0)
    return np.maximum(predictive_entropy(member_probabilities) - mean_entropy, 0.0)


def disagreement(member_probabilities: np.ndarray) -> np.ndarray:
    """Share of members whose prediction differs from the ensemble's: ``(M, B, C)`` -> ``(B,)``."""
    member_probabilities = np.asarray(member_probabilities)
    ensemble_prediction = member_probabilities.mean(axis=0).argmax(axis=-1)  # (B,)
    return (member_probabilities.argmax(axis=-1) != ensemble_prediction).mean(axis=0)


def energy(logits: np.ndarray) -> np.ndarray:
    """``logsumexp(logits)`` over the last axis (Liu et al. 2020; larger = more familiar)."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]


def max_logit(logits: np.ndarray) -> np.ndarray:
    """The largest logit (Hendrycks et al. 2022)."""
    return np.asarray(logits, dtype=np.float64).max(axis=-1)


# ------------------------------------------------------------------------ feature space


@dataclass(frozen=True)
class FeatureSpaceConfig:
    """Choices of the feature-space scores; each is a chosen default (DESIGN.md section 3)."""

    # Chosen default: Ledoit-Wolf shrinkage of the shared covariance. The empirical
    # covariance of these penultimate features has a condition number near 6e12, so its
    # inverse is dominated by rounding even in float64; shrinkage brings it near 1e3, which
    # also lets the bundle store the precision matrix in float32 (half the bytes). The
    # channel Mahalanobis score's 64 x 64 precision is shrunk the same way (stored in
    # float64: it is small).
    mahalanobis_shrinkage: str = "ledoit_wolf"
    # Chosen default: a seeded subsample of each member's normalized training features
    # (Sun et al. 2022 show a 1% subsample keeps most of KNN's power); stored as float16,
    # 0.8 MB a member, so that the committed bundle stays well under 25 MB.
    knn_bank_size: int = 500
    # Chosen default: k scaled down with the bank (the paper's k=50 for 50,000 images).
    knn_k: int = 5
    # ViM's principal dimension D: the paper's rule for features of about 768 dimensions
    # (D = 512 for N = 768); the residual is the 784 - 512 = 272 remaining directions.
    vim_dimension: int = 512
    # Chosen default: training images per member the statistics are fitted on (a seeded
    # subset; 20,000 pin a 784-dimensional covariance down well and halve the cost).
    fit_images: int = 20_000
    seed: int = 0


@dataclass(frozen=True)
class MahalanobisForm:
    """A shared precision ``P = U^T U`` and the class means whitened by ``U``.

    ``(h - mu_c)^T P (h - mu_c) = ||U h - U mu_c||^2``: with ``U`` upper triangular (the
    transposed Cholesky factor) a query costs one triangular product, which reads half of
    ``P``; at batch 1 the distance is bound by that read (measured 0.36 -> 0.25 ms a
    member on one BLAS thread), and at batch 256 a triangular product is half the
    multiplications of a general one. A precision that is
    not positive definite in float64 (no shrinkage) falls back to its symmetric square
    root with negative eigenvalues clipped, and a general product.
    """

    factor: np.ndarray  # (D, D) U, Fortran order for BLAS dtrmv/dtrmm
    means: np.ndarray  # (C, D) U mu_c
    mean_norms: np.ndarray  # (C,) ||U mu_c||^2 = mu_c^T P mu_c
    triangular: bool

    @classmethod
    def of(cls, class_means: np.ndarray, precision: np.ndarray) -> MahalanobisForm:
        precision = np.asarray(precision, dtype=np.float64)  # (D, D)
        try:
            factor, triangular = np.linalg.cholesky(precision).T, True  # P = L L^T, U = L^T
        except np.linalg.LinAlgError:
            values, vectors = np.linalg.eigh(precision)
            factor = np.sqrt(np.clip(values, 0.0, None))[:, None] * vectors.T
            triangular = False
        factor = np.asfortranarray(factor)
        means = _whiten(factor, triangular, class_means)  # (C, D)
        return cls(factor, means, (means**2).sum(axis=1), triangular)

    def whiten(self, rows: np.ndarray) -> np.ndarray:
        """``U h`` of every row: ``(B, D)`` -> ``(B, D)`` float64."""
        return _whiten(self.factor, self.triangular, rows)


def _whiten(factor: np.ndarray, triangular: bool, rows: np.ndarray) -> np.ndarray:
    """``factor @ h`` of every row ``(B, D)``; triangular BLAS where ``factor`` is."""
    rows = np.asarray(rows, dtype=np.float64)
    if not triangular:
        return rows @ factor.T
    if len(rows) == 1:
        return blas.dtrmv(factor, rows[0])[None]
    return blas.dtrmm(1.0, factor, np.asfortranarray(rows.T)).T


def mahalanobis_distance(
    features: np.ndarray,
    class_means: np.ndarray,
    precision: np.ndarray,
    form: MahalanobisForm | None = None,
) -> np.ndarray:
    """Smallest class-conditional Mahalanobis distance (squared), in float64 (Lee et al. 2018).

    ``min_c (h - mu_c)^T P (h - mu_c)`` with a shared precision ``P``; ``(B, D)`` -> ``(B,)``.
    The Mahalanobis score is its negation. ``form`` (:class:`MahalanobisForm`) depends
    only on the statistics, so the served path makes it once per bundle, not per request.
    """
    form = form or MahalanobisForm.of(class_means, precision)
    whitened = form.whiten(features)  # (B, D)
    squared = (
        (whitened**2).sum(axis=1, keepdims=True)
        - 2.0 * whitened @ form.means.T
        + form.mean_norms[None]
    )  # (B, C)
    return np.maximum(squared.min(axis=1), 0.0)


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """``h / ||h||`` per row in float64 (rows of zeros stay zero)."""
    h = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(h, axis=1, keepdims=True)
    return h / np.where(norms > 0, norms, 1.0)


def knn_distance(
    features: np.ndarray, bank: np.ndarray, k: int, bank_norms: np.ndarray | None = None
) -> np.ndarray:
    """Distance from ``h/||h||`` to its k-th nearest neighbour in a normalized bank.

    Sun et al. 2022.

    ``(B, D)`` and ``(N, D)`` -> ``(B,)``; the KNN score is its negation. ``bank_norms``
    ``(N,)`` is the bank's squared row norms, computed once by the served path.

    The products with the bank run in float32 (the bank is stored in float16, so float32
    holds it exactly): at batch 1 the score is bound by reading the bank, and float64
    read twice the bytes (0.29 against 0.12 ms a member, one member on two BLAS threads).
    A float32 dot product of unit vectors is off by about 1e-7, a ranking score needs
    no more; the norms and the subtraction stay in float64.
    """
    queries = normalize_rows(features)  # (B, D) float64
    bank = np.asarray(bank, dtype=np.float32)  # (N, D), rows of unit norm
    if bank_norms is None:
        bank_norms = (bank.astype(np.float64) ** 2).sum(axis=1)
    products = queries.astype(np.float32) @ bank.T  # (B, N) float32
    squared = (queries**2).sum(axis=1, keepdims=True) - 2.0 * products + bank_norms  # (B, N)
    kth = np.partition(squared, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(kth, 0.0))


def vim_virtual_logit(
    features: np.ndarray, origin: np.ndarray, null_space: np.ndarray, alpha: float
) -> np.ndarray:
    """ViM's virtual logit ``alpha * ||(h - u) R||`` (Wang et al. 2022).

    ``u = -pinv(W) b`` is the origin of the dense layer, ``R`` ``(D, D - d)`` spans the
    directions outside the principal subspace of the training features, ``alpha`` scales
    the residual to the training set's mean max logit. The ViM score is
    ``logsumexp(logits) - virtual logit``.

    The projection runs in float32, the precision ``R`` is stored in (half the bytes to
    read at batch 1, as for :func:`knn_distance`); centring and the norm in float64.
    """
    centered = np.asarray(features, dtype=np.float64) - np.asarray(origin, dtype=np.float64)
    null_space = np.asarray(null_space, dtype=np.float32)  # (D, D - d)
    residual = centered.astype(np.float32) @ null_space  # (B, D - d) float32
    return float(alpha) * np.linalg.norm(residual.astype(np.float64), axis=1)


@dataclass(frozen=True)
class _ServedStatistics:
    """One member's statistics in the dtype each score computes in, and their constant terms."""

    mahalanobis: MahalanobisForm
    knn_bank: np.ndarray  # (N, D) float32
    knn_bank_norms: np.ndarray  # (N,) float64
    vim_origin: np.ndarray  # (D,) float64
    vim_null_space: np.ndarray  # (D, D - d) float32
    channel_mahalanobis: MahalanobisForm


@dataclass(frozen=True)
class FeatureSpaceStatistics:
    """What one member's feature-space scores need, fitted on its training images."""

    class_means: np.ndarray  # (C, D) float64
    precision: np.ndarray  # (D, D) float32 (shrunk, see FeatureSpaceConfig)
    knn_bank: np.ndarray  # (N, D) float16, rows of unit norm
    knn_k: int
    vim_origin: np.ndarray  # (D,) float64
    vim_null_space: np.ndarray  # (D, D - d) float32
    vim_alpha: float
    channel_means: np.ndarray  # (C, S) float64, class means of the channel statistics
    channel_precision: np.ndarray  # (S, S) float64 (shrunk as the penultimate one)

    @cached_property
    def served(self) -> _ServedStatistics:
        """The same statistics in the form the scores compute with (the dtype each
        score's product runs in) and the terms that depend only on the statistics, made
        once per loaded bundle rather than once per request (the precision alone is
        784 x 784)."""
        bank = np.asarray(self.knn_bank, dtype=np.float32)
        return _ServedStatistics(
            mahalanobis=MahalanobisForm.of(self.class_means, self.precision),
            knn_bank=bank,
            knn_bank_norms=(bank.astype(np.float64) ** 2).sum(axis=1),
            vim_origin=np.asarray(self.vim_origin, dtype=np.float64),
            vim_null_space=np.asarray(self.vim_null_space, dtype=np.float32),
            channel_mahalanobis=MahalanobisForm.of(self.channel_means, self.channel_precision),
        )

    def save(self, path: Path) -> None:
        """One ``.npz`` per member; the precision is stored as its upper triangle."""
        upper = np.triu_indices(self.precision.shape[0])
        with open(path, "wb") as handle:
            np.savez(
                handle,
                class_means=self.class_means,
                precision_upper=self.precision[upper],
                knn_bank=self.knn_bank,
                knn_k=np.int64(self.knn_k),
                vim_origin=self.vim_origin,
                vim_null_space=self.vim_null_space,
                vim_alpha=np.float64(self.vim_alpha),
                channel_means=self.channel_means,
                channel_precision=self.channel_precision,
            )

    @classmethod
    def load(cls, path: Path) -> FeatureSpaceStatistics:
        """Read a member's ``.npz`` (plain arrays only: ``allow_pickle`` stays off)."""
        with np.load(path, allow_pickle=False) as data:
            means = data["class_means"]
            dimension = means.shape[1]
            precision = np.zeros((dimension, dimension), dtype=np.float32)
            upper = np.triu_indices(dimension)
            precision[upper] = data["precision_upper"]
            precision.T[upper] = data["precision_upper"]
            return cls(
                class_means=means,
                precision=precision,
                knn_bank=data["knn_bank"],
                knn_k=int(data["knn_k"]),
                vim_origin=data["vim_origin"],
                vim_null_space=data["vim_null_space"],
                vim_alpha=float(data["vim_alpha"]),
                channel_means=data["channel_means"],
                channel_precision=data["channel_precision"],
            )


def member_feature_space_scores(
    features: np.ndarray,
    logits: np.ndarray,
    channels: np.ndarray,
    statistics: FeatureSpaceStatistics,
) -> dict[str, np.ndarray]:
    """One member's feature-space confidences ``(B,)`` by name (larger = more familiar).

    ``features`` ``(B, D)`` penultimate activations, ``logits`` ``(B, C)``, ``channels``
    ``(B, S)`` channel statistics.
    """
    member_energy = energy(logits)
    served = statistics.served
    return {
        "energy": member_energy,
        "max_logit": max_logit(logits),
        "mahalanobis": -mahalanobis_distance(
            features, statistics.class_means, statistics.precision, served.mahalanobis
        ),
        "knn": -knn_distance(features, served.knn_bank, statistics.knn_k, served.knn_bank_norms),
        "vim": member_energy
        - vim_virtual_logit(
            features, served.vim_origin, served.vim_null_space, statistics.vim_alpha
        ),
        "channel_mahalanobis": -mahalanobis_distance(
            channels,
            statistics.channel_means,
            statistics.channel_precision,
            served.channel_mahalanobis,
        ),
    }


#: Feature-space scores, each the mean over members of the member's confidence.
FEATURE_SPACE_SCORE_NAMES: tuple[str, ...] = (
    "energy",
    "max_logit",
    "mahalanobis",
    "knn",
    "vim",
    "channel_mahalanobis",
)
#: The feature-space scores that are minus a squared distance (the heads see them on a
#: log scale, ``log(1 + distance)``).
DISTANCE_SCORE_NAMES: tuple[str, ...] = ("mahalanobis", "channel_mahalanobis")
#: Scores of the ensemble's predictive distribution and of its members' disagreement.
ENSEMBLE_SCORE_NAMES: tuple[str, ...] = (
    "softmax_baseline",
    "predictive_entropy",
    "mutual_information",
    "disagreement",
)

#: What each served score is, next to its maths above; the report and /docs show these.
SCORE_DESCRIPTIONS: dict[str, str] = {
    "softmax_baseline": "max of the members' mean softmax (Hendrycks and Gimpel 2017)",
    "predictive_entropy": "minus the entropy of the members' mean softmax",
    "mutual_information": "minus (predictive entropy - mean member entropy): member disagreement",
    "disagreement": "minus the share of members whose prediction differs from the ensemble's",
    "energy": "logsumexp of the logits (Liu et al. 2020), mean over members",
    "max_logit": "largest logit (Hendrycks et al. 2022), mean over members",
    "mahalanobis": "minus the smallest class-conditional Mahalanobis distance of the "
    "penultimate features, shared shrunk covariance, float64 (Lee et al. 2018), mean over members",
    "knn": "minus the distance of the normalized penultimate features to their k-th nearest "
    "training neighbour (Sun et al. 2022), mean over members",
    "vim": "energy minus ViM's virtual logit from the residual off the principal subspace "
    "(Wang et al. 2022), mean over members",
    "channel_mahalanobis": "minus the smallest class-conditional Mahalanobis distance of "
    "the channel statistics (each channel's mean and standard deviation over the pixels of "
    "the pooled conv1 and conv2 activations, 64 values: how the strokes look to the early "
    "layers), shared shrunk covariance (Lee et al. 2018's lower-layer features), mean over "
    "members",
}


#: The process's BLAS libraries, found once (a controller per call would cost more).
_BLAS = ThreadpoolController()


def member_scores(
    logits: np.ndarray,
    penultimate: np.ndarray,
    channel_statistics: np.ndarray,
    statistics: list[FeatureSpaceStatistics],
) -> dict[str, np.ndarray]:
    """Feature-space confidences of every member, by name, each ``(M, B)``.

    ``logits`` ``(M, B, C)``, ``penultimate`` ``(M, B, D)``, ``channel_statistics``
    ``(M, B, S)``: the engine's outputs of the same name.

    numpy's BLAS runs one thread here, whatever the batch. A second thread made one
    member alone faster at batch 1 (served cost / graph 1.71-1.92 against 2.38 with one,
    the benchmark's ``measure``, stop 24), but in the service it is a thread more than
    the cores: OpenBLAS's workers spin between calls, taking the core that the event loop
    and onnxruntime's own threads need. With 16 concurrent clients on 2 cores the service
    answered 92 requests/s with two BLAS threads and 299 with one (``OPENBLAS_NUM_THREADS``,
    stop 26). At batch 256 one thread was faster anyway (1.06-1.10 against 1.12-1.15).
    """
    with _BLAS.limit(limits=1, user_api="blas"):
        per_member = [
            member_feature_space_scores(
                penultimate[k], logits[k], channel_statistics[k], statistics[k]
            )
            for k in range(len(statistics))
        ]
    return {name: np.stack([scores[name] for scores in per_member]) for name in per_member[0]}


def ensemble_scores(
    probabilities: np.ndarray, feature_space: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every served score ``(B,)`` by name, each a confidence.

    ``probabilities`` ``(M, B, C)``; ``feature_space`` the members' feature-space
    confidences ``(M, B)`` by name (:func:`member_scores`).
    """
    scores = {
        "softmax_baseline": np.asarray(probabilities, dtype=np.float64).mean(axis=0).max(axis=-1),
        "predictive_entropy": -predictive_entropy(probabilities),
        "mutual_information": -mutual_information(probabilities),
        "disagreement": -disagreement(probabilities),
    }
    scores.update({name: feature_space[name].mean(axis=0) for name in FEATURE_SPACE_SCORE_NAMES})
    return scores
