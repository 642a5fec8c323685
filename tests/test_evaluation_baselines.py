"""Baselines and the score interface: formulas against direct computations on a real
(untrained) PaperCNN, and the registry every paper-level score is listed in."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from scoring.features import feature_names
from scoring.scores import mutual_information, predictive_entropy
from training.evaluation.baselines import BaselineConfig, mc_dropout_probabilities
from training.evaluation.meta import META_CLASSIFIER_NAMES, MetaConfig, make_meta_classifier
from training.evaluation.paper_scores import (
    BASELINE_NAMES,
    EnsembleEntropy,
    EnsembleMutualInformation,
    FeatureThreshold,
    MetaClassifierScore,
    ScoreInputs,
    paper_scores,
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
    both = ScoreInputs(np.zeros((2, 37)), member_probabilities=np.concatenate([agree, disagree], 1))
    assert EnsembleEntropy().confidence(both) == pytest.approx([-np.log(2), -np.log(2)])
    assert EnsembleMutualInformation().confidence(both) == pytest.approx([0.0, -np.log(2)])
    with pytest.raises(ValueError, match=re.escape("needs ScoreInputs.member_probabilities")):
        EnsembleEntropy().confidence(ScoreInputs(np.zeros((2, 37))))


def _baselines(model, images, config: BaselineConfig) -> dict[str, np.ndarray]:
    """Every baseline of the registry on one image set, by name."""
    scores = [s for s in paper_scores(MetaConfig(), config, 0) if s.kind == "baseline"]
    probabilities = np.stack([torch.softmax(model(images_to_tensor(images)), 1).detach().numpy()])
    inputs = ScoreInputs(np.zeros((len(images), 37)), probabilities, images, model)
    return {score.name: score.confidence(inputs) for score in scores}


def test_energy_and_gradnorm_match_autograd(model, images):
    confidences = _baselines(model, images, BaselineConfig(mc_dropout_passes=2))
    assert list(confidences) == list(BASELINE_NAMES)
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


def test_mc_dropout_entropy_is_the_entropy_of_the_stochastic_mean(model, images):
    config = BaselineConfig(mc_dropout_passes=3, batch_size=4, seed=2)
    stochastic = mc_dropout_probabilities(model, images, passes=3, batch_size=4, seed=2)
    np.testing.assert_allclose(
        _baselines(model, images, config)["mc_dropout_entropy"], -predictive_entropy(stochastic)
    )


def test_the_registry_lists_every_paper_score_once_in_report_order():
    scores = paper_scores(MetaConfig(), BaselineConfig(), seed=3)
    names = [score.name for score in scores]
    assert names == [*feature_names(), *META_CLASSIFIER_NAMES, *BASELINE_NAMES]
    assert {score.kind for score in scores} == {"feature", "meta_classifier", "baseline"}
    assert all(s.seed == 3 for s in scores if isinstance(s, MetaClassifierScore))
    assert [s.name for s in scores if s.needs_both_classes] == list(META_CLASSIFIER_NAMES)
    # fresh objects each call: one member's fit never leaks into the next member's
    assert paper_scores(MetaConfig(), BaselineConfig(), seed=3)[0] is not scores[0]


def test_a_feature_threshold_orients_its_feature_on_validation_data():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.7
    features = rng.normal(size=(200, 37))
    features[:, 4] = np.where(correct, -1.0, 1.0) + 0.3 * rng.normal(size=200)  # small = correct
    score = FeatureThreshold(4, feature_names()[4])
    score.fit(ScoreInputs(features), correct)
    assert score.direction == -1
    confidence = score.confidence(ScoreInputs(features))
    assert confidence[correct].mean() > confidence[~correct].mean()


def test_a_meta_classifier_describes_the_inputs_its_pipeline_really_takes():
    rng = np.random.default_rng(1)
    features, correct = np.abs(rng.normal(size=(300, 37))) + 0.1, rng.random(300) < 0.8
    for compress in (True, False):
        score = MetaClassifierScore("lasso", MetaConfig(compress_tails=compress), seed=0)
        steps = [name for name, _ in make_meta_classifier("lasso", score.config).steps]
        assert ("compress_tails" in steps) is compress
        assert ("arcsinh" in score.describe()["input"]) is compress
        assert "log scale" in score.describe()["input"]
    with pytest.raises(RuntimeError, match="before fit"):
        score.confidence(ScoreInputs(features))
    score.fit(ScoreInputs(features), correct)
    assert score.confidence(ScoreInputs(features)).shape == (300,)
