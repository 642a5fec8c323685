"""Training on real MNIST: it learns, it is reproducible, it resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.config import TrainingConfig
from training.overrides import apply_overrides
from training.train import load_member, member_split, train_ensemble, train_member


def small_config(**overrides) -> TrainingConfig:
    """A few thousand real images, a couple of epochs: seconds on two cores."""
    assignments = [
        "split.train_size=3000",
        "split.validation_size=1000",
        "split.test_size=1000",
        "split.calibration_size=1000",
        "optim.max_epochs=2",
        "ensemble_size=2",
    ]
    assignments += [f"{key}={value}" for key, value in overrides.items()]
    return apply_overrides(TrainingConfig(), assignments)


def test_member_splits_are_disjoint_and_differ_between_members():
    config = TrainingConfig()
    first, second = member_split(config, 0, 60_000, 10_000), member_split(config, 1, 60_000, 10_000)
    assert len(first.train) == 40_000 and len(first.validation) == 5_000
    assert len(first.test) == 10_000 and len(first.calibration) == 15_000
    union = np.concatenate([first.train, first.validation, first.test, first.calibration])
    assert len(np.unique(union)) == 70_000
    # test = the official test set, calibration held out of every member: both shared
    np.testing.assert_array_equal(first.test, np.arange(60_000, 70_000))
    np.testing.assert_array_equal(first.calibration, second.calibration)
    assert not np.array_equal(first.validation, second.validation)
    assert not set(second.train) & set(first.calibration)


def test_split_that_leaves_no_training_images_is_refused():
    config = apply_overrides(
        TrainingConfig(), ["split.calibration_size=40000", "split.validation_size=20000"]
    )
    with pytest.raises(ValueError, match="leaves no training images out of 60000"):
        member_split(config, 0, 60_000, 10_000)


def test_a_capped_test_split_is_a_fixed_subset_of_the_official_test_set():
    config = apply_overrides(TrainingConfig(), ["split.test_size=500"])
    first, second = member_split(config, 0, 60_000, 10_000), member_split(config, 3, 60_000, 10_000)
    np.testing.assert_array_equal(first.test, second.test)
    assert len(first.test) == 500 and first.test.min() >= 60_000


def test_short_run_on_real_mnist_is_far_better_than_chance(mnist_pooled):
    model, result = train_member(small_config(), 0, mnist_pooled, progress=False)
    # Chance is 10%; 3,000 images and two epochs already give well over 80%.
    assert result.test_accuracy > 0.8, result
    assert result.split_sizes == {
        "train": 3000,
        "validation": 1000,
        "test": 1000,
        "calibration": 1000,
    }


def test_same_seed_gives_identical_weights_and_other_seed_does_not(mnist_pooled):
    config = small_config(**{"split.train_size": 1000, "optim.max_epochs": 1})
    first, _ = train_member(config, 0, mnist_pooled, progress=False)
    again, _ = train_member(config, 0, mnist_pooled, progress=False)
    other, _ = train_member(config, 1, mnist_pooled, progress=False)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.conv1.weight, other.conv1.weight)


def test_ensemble_resumes_from_saved_members(mnist_pooled, tmp_path):
    config = small_config(**{"split.train_size": 500, "optim.max_epochs": 1})
    records = train_ensemble(config, mnist_pooled, tmp_path, progress=False, log=lambda _: None)
    assert [r["member"] for r in records] == [0, 1]
    stamp = (tmp_path / "member_1.json").stat().st_mtime_ns
    (tmp_path / "member_0.json").unlink()  # as if interrupted while training member 0
    messages = []
    train_ensemble(config, mnist_pooled, tmp_path, progress=False, log=messages.append)
    assert (tmp_path / "member_1.json").stat().st_mtime_ns == stamp
    assert "member 1: already trained" in messages[1]
    model, record = load_member(tmp_path, 1)
    assert record["test_accuracy"] == records[1]["test_accuracy"]
    assert not model.training


def test_resume_with_another_configuration_is_refused(mnist_pooled, tmp_path):
    config = small_config(**{"split.train_size": 500, "optim.max_epochs": 1, "ensemble_size": 1})
    train_ensemble(config, mnist_pooled, tmp_path, progress=False, log=lambda _: None)
    changed = apply_overrides(config, ["optim.learning_rate=0.2"])
    with pytest.raises(ValueError, match="trained with another configuration"):
        train_ensemble(changed, mnist_pooled, tmp_path, progress=False, log=lambda _: None)
    assert json.loads((tmp_path / "member_0.json").read_text())["config"] == config.to_dict()
