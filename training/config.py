"""The one training configuration.

The paper's copy lost most hyperparameters (DESIGN.md section 4). Every value below
that the paper does not fix is a *chosen default*, marked as such, and every field can
be overridden from the command line (``python -m training train --help``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the paper's CNN."""

    # Paper: 16 filters per conv layer, stride 1. Filter size lost: chosen default 3x3,
    # with "same" padding so that two 2x2 poolings take 28 -> 14 -> 7.
    filters: int = 16
    kernel_size: int = 3
    # Chosen default: the paper's formula for the leaky ReLU slope was lost.
    leaky_relu_slope: float = 0.1
    # Paper: dropout after the first and third conv layer; rate lost, chosen default.
    dropout: float = 0.25


@dataclass(frozen=True)
class SplitConfig:
    """How each member splits the pooled known concept (all 70,000 MNIST images)."""

    # Chosen defaults: the paper's split sizes were lost. The validation split is what
    # the meta classifiers are fitted on, so it is as large as the test split.
    validation_size: int = 10_000
    test_size: int = 10_000
    # Chosen default: 0 means "everything that is left" goes to training. A smaller
    # number trains on a subset (tests, quick experiments).
    train_size: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum, L2 in the loss, plateau schedule and early stopping."""

    # Paper: SGD with momentum and categorical cross entropy; values lost, chosen defaults.
    batch_size: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    # Chosen default: L2 penalty weight * sum(w^2) over all weights (not biases).
    l2: float = 1e-4
    # Paper: the learning rate is reduced by a factor when validation accuracy stagnates,
    # down to a floor. Chosen defaults for factor, patience and floor.
    lr_reduce_factor: float = 0.5
    lr_patience: int = 1
    lr_floor: float = 1e-4
    # Chosen defaults: stop after this many epochs without a better validation accuracy,
    # and never run longer than max_epochs.
    early_stopping_patience: int = 4
    max_epochs: int = 30


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that determines an ensemble, reproducible from ``seed``."""

    # Chosen default: the paper's ensemble size was lost; five members give a mean and
    # standard deviation at a training cost this machine can afford.
    ensemble_size: int = 5
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def member_seed(self, member: int) -> int:
        """Seed of one member: its own permutation, initial weights and batch order."""
        return self.seed * 1_000 + member

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainingConfig:
        return cls(
            ensemble_size=values["ensemble_size"],
            seed=values["seed"],
            model=ModelConfig(**values["model"]),
            split=SplitConfig(**values["split"]),
            optim=OptimConfig(**values["optim"]),
        )
