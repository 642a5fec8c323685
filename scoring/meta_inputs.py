"""How a member's feature vector is prepared for the meta classifiers.

Lives in ``scoring`` because the fitted meta classifiers refer to :func:`log_magnitude`
by name: the service (which has ``scoring`` but no torch) must be able to unpickle them.

Entropy and the gradients' norms, minima and maxima span many orders of magnitude (a
confident prediction has a gradient near 1e-8, a confused one near 1); standardized as
they are, a linear meta classifier cannot tell 1e-6 from 1e-4, which is where the
wrong predictions hide among the right ones. Those features enter on a log scale.
"""

from __future__ import annotations

import numpy as np

from scoring.features import METRIC_NAMES, feature_names, meta_feature_indices

__all__ = ["MAGNITUDE_FLOOR", "log_magnitude", "magnitude_columns", "plain_columns"]

#: Chosen default: magnitudes below this are treated as zero on the log scale; well under
#: the smallest gradient a float32 network produces for a confident prediction.
MAGNITUDE_FLOOR = 1e-12

#: Features whose size, not their sign pattern, carries the information.
_MAGNITUDE_METRICS = ("abs_norm", "euclidean_norm", "min", "max")
assert set(_MAGNITUDE_METRICS) <= set(METRIC_NAMES)


def log_magnitude(values: np.ndarray) -> np.ndarray:
    """``sign(x) * log1p(|x| / MAGNITUDE_FLOOR)``: order- and sign-preserving log scale."""
    values = np.asarray(values, dtype=np.float64)
    return np.sign(values) * np.log1p(np.abs(values) / MAGNITUDE_FLOOR)


def magnitude_columns() -> list[int]:
    """Columns that enter on the log scale: entropy and the norms, minima and maxima."""
    names = feature_names()
    return [
        i
        for i in meta_feature_indices()
        if names[i] == "entropy" or names[i].split("@")[0] in _MAGNITUDE_METRICS
    ]


def plain_columns() -> list[int]:
    """Every other column the meta classifiers use (structurally zero ones are dropped)."""
    magnitude = set(magnitude_columns())
    return [i for i in meta_feature_indices() if i not in magnitude]
