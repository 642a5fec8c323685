"""Fitting the feature-space scores' statistics on one member's training images.

The scores themselves are computed in :mod:`scoring.scores` (numpy, no torch); this is the
offline half that fits what they need, with scikit-learn's covariance estimators, from
the penultimate activations and channel statistics the member's scorer graph emits (the
same numbers the service later scores).
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import EmpiricalCovariance, LedoitWolf

from scoring.scores import FeatureSpaceConfig, FeatureSpaceStatistics, max_logit, normalize_rows

__all__ = ["fit_feature_space"]


def fit_feature_space(
    penultimate: np.ndarray,
    logits: np.ndarray,
    channel_statistics: np.ndarray,
    labels: np.ndarray,
    dense_weight: np.ndarray,
    dense_bias: np.ndarray,
    config: FeatureSpaceConfig,
) -> FeatureSpaceStatistics:
    """Statistics of one member from its training images.

    Parameters
    ----------
    penultimate : ndarray of shape (N, D)
        The dense layer's inputs on the member's training images.
    logits : ndarray of shape (N, C)
    channel_statistics : ndarray of shape (N, S)
        The graph's channel statistics (pooled conv1 and conv2 channel means and
        standard deviations) on the same images.
    labels : ndarray of shape (N,)
        True classes (Mahalanobis class means use the labels, as Lee et al. do).
    dense_weight, dense_bias : ndarray of shape (C, D) and (C,)
        The member's dense layer (ViM's origin ``u = -pinv(W) b``).
    config : FeatureSpaceConfig
    """
    h = np.asarray(penultimate, dtype=np.float64)  # (N, D)
    labels = np.asarray(labels)
    means, precision = _class_gaussian(h, labels, config.mahalanobis_shrinkage)
    channel_means, channel_precision = _class_gaussian(
        np.asarray(channel_statistics, dtype=np.float64), labels, config.mahalanobis_shrinkage
    )

    rng = np.random.default_rng(config.seed)
    bank_size = min(config.knn_bank_size, len(h))
    if config.knn_k < 1 or config.knn_k > bank_size:
        raise ValueError(f"feature_space.knn_k must be in [1, {bank_size}], got {config.knn_k}")
    bank = normalize_rows(h[np.sort(rng.choice(len(h), size=bank_size, replace=False))])

    weight = np.asarray(dense_weight, dtype=np.float64)
    origin = -np.linalg.pinv(weight) @ np.asarray(dense_bias, dtype=np.float64)  # (D,)
    dimension = h.shape[1]
    if not 0 < config.vim_dimension < dimension:
        raise ValueError(
            f"feature_space.vim_dimension must be in (0, {dimension}), got {config.vim_dimension}"
        )
    principal = EmpiricalCovariance(assume_centered=True).fit(h - origin).covariance_
    eigenvalues, eigenvectors = np.linalg.eigh(principal)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    null_space = np.ascontiguousarray(eigenvectors[:, order[config.vim_dimension :]])  # (D, D-d)
    residual = np.linalg.norm((h - origin) @ null_space, axis=1)
    alpha = float(max_logit(logits).mean() / residual.mean())
    return FeatureSpaceStatistics(
        class_means=means,
        precision=precision.astype(np.float32),
        knn_bank=bank.astype(np.float16),
        knn_k=int(config.knn_k),
        vim_origin=origin,
        vim_null_space=null_space.astype(np.float32),
        vim_alpha=alpha,
        channel_means=channel_means,
        channel_precision=channel_precision,
    )


def _class_gaussian(
    features: np.ndarray, labels: np.ndarray, shrinkage: str
) -> tuple[np.ndarray, np.ndarray]:
    """Class means ``(C, D)`` and the shared precision ``(D, D)`` (float64) of ``(N, D)``
    features: Lee et al.'s class-conditional Gaussians with one tied covariance."""
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])  # (C, D)
    centered = features - means[np.searchsorted(classes, labels)]
    if shrinkage == "ledoit_wolf":
        covariance = LedoitWolf(assume_centered=True).fit(centered)
    elif shrinkage == "none":
        covariance = EmpiricalCovariance(assume_centered=True).fit(centered)
    else:
        raise ValueError(
            "feature_space.mahalanobis_shrinkage must be 'ledoit_wolf' or 'none', "
            f"got {shrinkage!r}"
        )
    return means, covariance.precision_
