"""The torch.func reference against a per-image autograd loop and scipy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.stats
import torch

from scoring.features import LAYER_NAMES, METRIC_NAMES
from training.model import PaperCNN
from training.reference import gradient_statistics, naive_gradient_metrics, reference_scores

BATCH = 6


@pytest.fixture(scope="module")
def model() -> PaperCNN:
    torch.manual_seed(0)
    return PaperCNN().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    noise = torch.rand(BATCH - 2, 1, 28, 28, generator=generator)
    blank = torch.zeros(1, 1, 28, 28)
    constant = torch.full((1, 1, 28, 28), 0.5)
    return torch.cat([noise, blank, constant])  # (B, 1, 28, 28)


def test_shapes_and_softmax_scores(model, images):
    scores = reference_scores(model, images)
    assert scores.probabilities.shape == (BATCH, 10)
    assert scores.entropy.shape == (BATCH,)
    assert scores.softmax_baseline.shape == (BATCH,)
    assert scores.gradient_metrics.shape == (BATCH, len(LAYER_NAMES), len(METRIC_NAMES))
    probabilities = torch.softmax(model(images), dim=1).detach()
    torch.testing.assert_close(scores.probabilities, probabilities)
    expected_entropy = -(probabilities * probabilities.log()).sum(dim=1)
    torch.testing.assert_close(scores.entropy, expected_entropy)
    torch.testing.assert_close(scores.softmax_baseline, probabilities.amax(dim=1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_naive_loop(model, images, dtype):
    reference = reference_scores(model, images, dtype=dtype).gradient_metrics
    naive = naive_gradient_metrics(model, images, dtype=dtype)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(reference, naive, rtol=tolerance, atol=tolerance)


def test_all_layer_is_every_parameter(model, images):
    """The "all" metrics are the statistics of all parameters' gradients concatenated."""
    image = images[:1]
    logits = model(image)
    loss = -torch.log_softmax(logits, dim=1)[0, logits.argmax()]
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    everything = torch.cat([g.flatten() for g in gradients]).double().numpy()
    all_metrics = reference_scores(model, image, dtype=torch.float64).gradient_metrics[0, -1]
    assert everything.size == sum(p.numel() for p in model.parameters())
    np.testing.assert_allclose(all_metrics[0].item(), np.abs(everything).sum(), rtol=1e-5)


def test_statistics_match_scipy():
    rng = np.random.default_rng(0)
    vectors = np.stack(
        [rng.standard_normal(500), rng.exponential(size=500) ** 3, rng.uniform(-1, 2, 500)]
    )
    statistics = gradient_statistics(torch.as_tensor(vectors)).numpy()  # (3, 7)
    expected = np.stack(
        [
            np.abs(vectors).sum(axis=1),
            np.linalg.norm(vectors, axis=1),
            vectors.min(axis=1),
            vectors.max(axis=1),
            vectors.mean(axis=1),
            scipy.stats.skew(vectors, axis=1),
            scipy.stats.kurtosis(vectors, axis=1),
        ],
        axis=1,
    )
    np.testing.assert_allclose(statistics, expected, rtol=1e-10, atol=1e-12)


def test_constant_vector_has_zero_skewness_and_kurtosis():
    vectors = torch.stack([torch.zeros(10, dtype=torch.float64), torch.full((10,), 2.0)])
    statistics = gradient_statistics(vectors)
    assert statistics[:, METRIC_NAMES.index("skewness")].tolist() == [0.0, 0.0]
    assert statistics[:, METRIC_NAMES.index("kurtosis")].tolist() == [0.0, 0.0]
    assert statistics[1, METRIC_NAMES.index("euclidean_norm")].item() == pytest.approx(
        2.0 * 10**0.5
    )


def test_rejects_wrong_image_shape(model):
    message = "images must have shape (B, 1, 28, 28), got (2, 28, 28)"
    with pytest.raises(ValueError, match=re.escape(message)):
        reference_scores(model, torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match=re.escape(message)):
        naive_gradient_metrics(model, torch.zeros(2, 28, 28))
