"""The torch reference for per-sample gradient metrics: the test oracle.

For a member network and a batch of images this computes what DESIGN.md section 3
defines: the probabilities, the entropy, the softmax baseline, and the seven statistics
(:data:`scoring.features.METRIC_NAMES`) of the per-sample gradient of the loss at the
predicted class, ``L = -log p_y``, for every layer (weight and bias together) and for
the whole network ("all"), in :data:`scoring.features.LAYER_NAMES` order.

Two implementations of the same numbers:

- :func:`reference_scores` - ``torch.func``: ``vmap(grad(...))`` over
  ``functional_call``, one batched call. This is the oracle the exported scorer graph
  is held against.
- :func:`naive_gradient_metrics` - one autograd backward per image in a Python loop,
  the way the paper's authors compute it. It checks the oracle and is the benchmark's
  "naive loop".

Precision: in float32 the gradient of ``-log p_y`` is ``p_y - 1``, which is quantised in
steps of 6e-8; for a confident prediction (``1 - p_y`` below about 1e-6) that error
dominates the whole gradient. Pass ``dtype=torch.float64`` for an oracle that is exact
to far below the scorer graph's tolerance (the tests and the export check do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from scoring.features import LAYER_NAMES, METRIC_NAMES
from training.model import PaperCNN

__all__ = [
    "ReferenceScores",
    "gradient_statistics",
    "naive_gradient_metrics",
    "reference_scores",
    "softmax_scores",
]

#: The trainable layers of :class:`PaperCNN`, in forward order (LAYER_NAMES minus "all").
PARAMETER_LAYERS: tuple[str, ...] = LAYER_NAMES[:-1]


@dataclass(frozen=True)
class ReferenceScores:
    """The scores of one member for a batch of ``B`` images (torch tensors, one dtype)."""

    probabilities: torch.Tensor  # (B, 10)
    entropy: torch.Tensor  # (B,)
    softmax_baseline: torch.Tensor  # (B,)
    gradient_metrics: torch.Tensor  # (B, len(LAYER_NAMES), len(METRIC_NAMES))


def gradient_statistics(vectors: torch.Tensor) -> torch.Tensor:
    """The seven statistics of each row of ``vectors`` ``(B, N)`` -> ``(B, 7)``.

    Population moments about the mean (scipy.stats' defaults): skewness m3 / m2^1.5 and
    excess kurtosis m4 / m2^2 - 3, both 0 where m2 == 0 (a constant vector).
    """
    mean = vectors.mean(dim=1)  # (B,)
    centred = vectors - mean[:, None]  # (B, N)
    squared = centred * centred
    m2 = squared.mean(dim=1)
    m3 = (squared * centred).mean(dim=1)
    m4 = (squared * squared).mean(dim=1)
    degenerate = m2 == 0
    safe_m2 = torch.where(degenerate, torch.ones_like(m2), m2)
    skewness = torch.where(degenerate, torch.zeros_like(m2), m3 / safe_m2**1.5)
    kurtosis = torch.where(degenerate, torch.zeros_like(m2), m4 / safe_m2**2 - 3.0)
    statistics = (
        vectors.abs().sum(dim=1),
        torch.linalg.vector_norm(vectors, dim=1),
        vectors.amin(dim=1),
        vectors.amax(dim=1),
        mean,
        skewness,
        kurtosis,
    )
    assert len(statistics) == len(METRIC_NAMES)
    return torch.stack(statistics, dim=1)  # (B, 7)


def layer_vectors(gradients: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-sample gradients by parameter name -> one ``(B, N_layer)`` per layer, then "all"."""
    per_layer = [
        torch.cat(
            [gradients[f"{layer}.weight"].flatten(1), gradients[f"{layer}.bias"].flatten(1)], dim=1
        )
        for layer in PARAMETER_LAYERS
    ]
    return [*per_layer, torch.cat(per_layer, dim=1)]


def metrics_from_gradients(gradients: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample gradients by parameter name -> ``(B, L, S)`` gradient metrics."""
    return torch.stack([gradient_statistics(v) for v in layer_vectors(gradients)], dim=1)


def softmax_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities ``(B, 10)``, entropy ``(B,)`` (natural log) and max probability ``(B,)``."""
    log_probabilities = F.log_softmax(logits, dim=1)
    probabilities = log_probabilities.exp()
    entropy = -(probabilities * log_probabilities).sum(dim=1)
    return probabilities, entropy, probabilities.amax(dim=1)


def _in_dtype(model: PaperCNN, dtype: torch.dtype) -> PaperCNN:
    """``model`` itself when it already has ``dtype``, else a converted copy in eval mode."""
    if next(model.parameters()).dtype == dtype:
        return model.eval()
    copy = PaperCNN(model.config, model.dense.out_features)
    copy.load_state_dict(model.state_dict())
    return copy.to(dtype).eval()


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must have shape (B, 1, 28, 28), got {tuple(images.shape)}")


def reference_scores(
    model: PaperCNN, images: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> ReferenceScores:
    """Scores of one member with ``torch.func`` (``vmap(grad(...))``), the oracle.

    Parameters
    ----------
    model : PaperCNN
        The member; evaluated in eval mode (dropout off), never modified.
    images : torch.Tensor of shape (B, 1, 28, 28)
        Network input in [0, 1].
    dtype : torch.dtype, default torch.float32
        Precision of the whole computation; float64 makes an exact oracle (module
        docstring), float32 is what a torch service would run.
    """
    _check_images(images)
    model = _in_dtype(model, dtype)
    images = images.to(dtype)
    parameters = {name: value.detach() for name, value in model.named_parameters()}

    with torch.no_grad():
        probabilities, entropy, baseline = softmax_scores(model(images))
    predicted = probabilities.argmax(dim=1)  # (B,)

    def loss(params: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor):
        logits = functional_call(model, params, (image[None],))  # (1, 10)
        log_probabilities = F.log_softmax(logits, dim=1)[0]  # (10,)
        return -torch.gather(log_probabilities, 0, label[None])[0]

    gradients = vmap(grad(loss), in_dims=(None, 0, 0))(parameters, images, predicted)
    return ReferenceScores(probabilities, entropy, baseline, metrics_from_gradients(gradients))


def naive_gradient_metrics(
    model: PaperCNN, images: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gradient metrics ``(B, L, S)`` with one autograd backward per image in a Python loop.

    This is how the paper's authors compute the metrics; it is the benchmark's baseline
    and an independent check of :func:`reference_scores`.
    """
    _check_images(images)
    model = _in_dtype(model, dtype)
    images = images.to(dtype)
    names, parameters = zip(*model.named_parameters(), strict=True)
    rows = []
    for image in images:
        logits = model(image[None])  # (1, 10)
        predicted = int(logits.argmax(dim=1))
        loss = -F.log_softmax(logits, dim=1)[0, predicted]
        gradients = torch.autograd.grad(loss, parameters)
        per_sample = {name: g[None] for name, g in zip(names, gradients, strict=True)}
        rows.append(metrics_from_gradients(per_sample))  # (1, L, S)
    return torch.cat(rows, dim=0)
