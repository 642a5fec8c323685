"""Baselines: formulas against direct computations on a real (untrained) PaperCNN."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from training.evaluation.baselines import (
    BaselineConfig,
    ensemble_confidences,
    mc_dropout_probabilities,
    member_confidences,
    mutual_information,
    predictive_entropy,
)
from training.model import PaperCNN, images_to_tensor


@pytest.fixture(scope="module")
def model() -> PaperCNN:
    torch.manual_seed(0)
    return PaperCNN().eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)


def test_ensemble_entropy_and_mutual_information():
    agree = np.array([[[0.5, 0.5]], [[0.5, 0.5]]])  # (M=2, B=1, C=2)
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert predictive_entropy(agree)[0] == pytest.approx(np.log(2))
    assert mutual_information(agree)[0] == pytest.approx(0.0)
    # confident members that disagree: all of the entropy is epistemic
    assert mutual_information(disagree)[0] == pytest.approx(np.log(2))
    confidences = ensemble_confidences(np.concatenate([agree, disagree], axis=1))
    assert confidences["ensemble_entropy"] == pytest.approx([-np.log(2), -np.log(2)])
    assert confidences["ensemble_mutual_information"] == pytest.approx([0.0, -np.log(2)])
    with pytest.raises(ValueError, match=re.escape("got (2, 2)")):
        ensemble_confidences(np.ones((2, 2)))


def test_energy_and_gradnorm_match_autograd(model, images):
    confidences = member_confidences(model, images, BaselineConfig(mc_dropout_passes=2))
    inputs = images_to_tensor(images)
    with torch.no_grad():
        logits = model(inputs)
    np.testing.assert_allclose(
        confidences["energy"], torch.logsumexp(logits, dim=1).numpy(), rtol=1e-5
    )
    for index in range(len(images)):
        model.zero_grad()
        log_probabilities = F.log_softmax(model(inputs[index : index + 1]), dim=1)
        # KL(uniform || softmax) = -log C - mean_i log p_i
        kl = -np.log(10) - log_probabilities.mean()
        kl.backward()
        expected = model.dense.weight.grad.abs().sum().item()
        assert confidences["gradnorm"][index] == pytest.approx(expected, rel=1e-4)
    model.zero_grad()


def test_mc_dropout_is_stochastic_seeded_and_restores_modes(model, images):
    first = mc_dropout_probabilities(model, images, passes=3, batch_size=4, seed=1)
    again = mc_dropout_probabilities(model, images, passes=3, batch_size=4, seed=1)
    assert first.shape == (3, 6, 10)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first[0], first[1])  # dropout is active
    assert not model.training and not model.dropout.training
    with torch.no_grad():
        deterministic = torch.softmax(model(images_to_tensor(images)), 1).numpy()
    assert not np.allclose(first.mean(0), deterministic)
    with pytest.raises(ValueError, match=re.escape("'passes' parameter must be >= 1, got 0")):
        mc_dropout_probabilities(model, images, passes=0)
