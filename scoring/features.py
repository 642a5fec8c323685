"""The fixed, named order of one member's feature vector (DESIGN.md section 3).

A feature vector is ``[entropy, softmax_baseline, <metric>@<layer> ...]`` with the
gradient metrics of every layer and of the whole network ("all"). The scorer graph
emits the gradient statistics as one array ``[B, len(LAYER_NAMES), len(METRIC_NAMES)]``
in exactly these orders; everything else (meta classifiers, reports, the HTTP
response) names features through this module.
"""

from __future__ import annotations

__all__ = [
    "LAYER_NAMES",
    "METRIC_NAMES",
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "feature_names",
    "gradient_feature_name",
]

#: Ten digit classes.
NUM_CLASSES = 10

#: Network input is one 28x28 channel, MNIST framing.
IMAGE_SIZE = 28

#: Trainable layers of the paper's CNN, in forward order, then the whole network.
LAYER_NAMES: tuple[str, ...] = ("conv1", "conv2", "conv3", "dense", "all")

#: The seven statistics of a gradient vector, in the order the scorer graph emits them.
METRIC_NAMES: tuple[str, ...] = (
    "abs_norm",
    "euclidean_norm",
    "min",
    "max",
    "mean",
    "skewness",
    "kurtosis",
)

#: The softmax features that precede the gradient metrics.
SOFTMAX_FEATURES: tuple[str, ...] = ("entropy", "softmax_baseline")


def gradient_feature_name(metric: str, layer: str) -> str:
    """Name of one gradient feature, e.g. ``euclidean_norm@conv2``."""
    return f"{metric}@{layer}"


def feature_names() -> list[str]:
    """All feature names of one member, in the fixed order of the feature vector."""
    names = list(SOFTMAX_FEATURES)
    for layer in LAYER_NAMES:
        for metric in METRIC_NAMES:
            names.append(gradient_feature_name(metric, layer))
    return names


#: Features that are zero in exact arithmetic, so that their computed value is float32
#: rounding noise whose size depends on the batch an image was scored in. The dense
#: layer's gradient is ``outer(p - onehot(y), h)`` plus the bias gradient ``p - onehot(y)``,
#: and ``p - onehot(y)`` sums to zero, so the mean over the dense layer is exactly 0.
#: They stay in the feature vector (and in the report, which shows them useless), but
#: meta classifiers must not see them: standardizing noise turns it into a signal that
#: then decides answers differently from batch to batch.
STRUCTURALLY_ZERO_FEATURES: tuple[str, ...] = (gradient_feature_name("mean", "dense"),)


def meta_feature_indices() -> list[int]:
    """Columns of the feature vector that meta classifiers use (all but the noise ones)."""
    return [i for i, name in enumerate(feature_names()) if name not in STRUCTURALLY_ZERO_FEATURES]
