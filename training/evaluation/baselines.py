"""Uncertainty baselines beyond the paper, behind one interface.

Every function here returns a **confidence**: an array of shape ``(n_samples,)`` where
larger means "more likely a correct prediction on an in-distribution input", the
orientation of every score in the report (:mod:`training.evaluation.metrics`).

- ``ensemble_entropy`` - deep ensemble (Lakshminarayanan et al. 2017): entropy of the
  members' mean softmax, negated.
- ``ensemble_mutual_information`` - the ensemble's epistemic part, ``H(mean p) -
  mean H(p)`` (the BALD mutual information), negated.
- ``mc_dropout_entropy`` - MC dropout (Gal and Ghahramani 2016): entropy of the mean
  softmax over ``T`` stochastic passes with the CNN's dropout layers active, negated.
- ``energy`` - energy score (Liu et al. 2020): the energy is ``-logsumexp(logits)``,
  the confidence its negation ``logsumexp(logits)``.
- ``gradnorm`` - GradNorm (Huang et al. 2021): the L1 norm of the gradient of
  ``KL(uniform || softmax(logits))`` with respect to the last layer's weights; larger
  for in-distribution inputs, so it is the confidence itself.

The deep-ensemble scores need every member's probabilities on the same images; the
others need one member's torch model (``PaperCNN`` in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.model import images_to_tensor

__all__ = [
    "BASELINE_NAMES",
    "BaselineConfig",
    "predictive_entropy",
    "mutual_information",
    "ensemble_confidences",
    "member_confidences",
    "mc_dropout_probabilities",
    "energy_confidence",
    "gradnorm_confidence",
]

#: All baselines, in report order.
BASELINE_NAMES: tuple[str, ...] = (
    "ensemble_entropy",
    "ensemble_mutual_information",
    "mc_dropout_entropy",
    "energy",
    "gradnorm",
)


@dataclass(frozen=True)
class BaselineConfig:
    """Chosen defaults of the baselines."""

    # Chosen default: 10 stochastic passes. Each pass costs one forward pass (~12k
    # images/s on 2 CPU cores), so 60k images per member cost ~50 s; the entropy of the
    # mean softmax changes little beyond ~10 passes for a CNN with two dropout layers.
    mc_dropout_passes: int = 10
    # Chosen default: large forward batches under no_grad; only memory depends on it.
    batch_size: int = 4096
    # Seed of the dropout masks (a forked RNG: the global torch RNG is left untouched).
    seed: int = 0


def predictive_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy (natural log) of the mean over axis 0 of ``(K, B, C)`` probabilities -> ``(B,)``."""
    mean = np.asarray(probabilities, dtype=np.float64).mean(axis=0)  # (B, C)
    return -(mean * np.log(np.clip(mean, 1e-300, None))).sum(axis=1)


def mutual_information(probabilities: np.ndarray) -> np.ndarray:
    """``H(mean_k p_k) - mean_k H(p_k)`` for ``(K, B, C)`` probabilities -> ``(B,)``, >= 0."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    member_entropy = -(probabilities * np.log(np.clip(probabilities, 1e-300, None))).sum(axis=2)
    return np.maximum(predictive_entropy(probabilities) - member_entropy.mean(axis=0), 0.0)


def ensemble_confidences(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Deep-ensemble confidences from all members' probabilities ``(M, B, 10)``."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 3:
        raise ValueError(
            "'probabilities' must have shape (members, samples, classes), "
            f"got {probabilities.shape}"
        )
    return {
        "ensemble_entropy": -predictive_entropy(probabilities),
        "ensemble_mutual_information": -mutual_information(probabilities),
    }


def _batches(images: np.ndarray, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images_to_tensor(images[start : start + batch_size])  # (b, 1, 28, 28)


@torch.no_grad()
def mc_dropout_probabilities(
    model: nn.Module, images: np.ndarray, passes: int = 10, batch_size: int = 4096, seed: int = 0
) -> np.ndarray:
    """Softmax of ``passes`` stochastic forward passes, shape ``(passes, B, 10)``.

    Only the ``nn.Dropout`` modules are switched to training mode (nothing else in the
    model may behave differently); the model's modes are restored afterwards.
    """
    if passes < 1:
        raise ValueError(f"The 'passes' parameter must be >= 1, got {passes!r}")
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    if not dropouts:
        raise ValueError("MC dropout needs a model with nn.Dropout layers; this one has none")
    modes = {module: module.training for module in model.modules()}
    classes = _last_linear(model).out_features  # 10 for digits; a user's set has its own
    outputs = np.empty((passes, len(images), classes), dtype=np.float32)
    try:
        model.eval()
        for module in dropouts:
            module.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            offset = 0
            for batch in _batches(images, batch_size):
                for index in range(passes):
                    probabilities = torch.softmax(model(batch), dim=1)  # (b, 10)
                    outputs[index, offset : offset + len(batch)] = probabilities.numpy()
                offset += len(batch)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return outputs


def _last_linear(model: nn.Module) -> nn.Linear:
    layers = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not layers:
        raise ValueError("GradNorm needs a model whose last layer is nn.Linear; it has none")
    return layers[-1]


@torch.no_grad()
def _logits_and_last_inputs(
    model: nn.Module, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits ``(B, 10)`` and the input of the last linear layer ``(B, D)``."""
    last = _last_linear(model)
    captured: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    was_training = model.training
    model.eval()
    logits = []
    try:
        for batch in _batches(images, batch_size):
            logits.append(model(batch))
    finally:
        handle.remove()
        model.train(was_training)
    if not logits:
        return np.zeros((0, last.out_features)), np.zeros((0, last.in_features))
    return torch.cat(logits).double().numpy(), torch.cat(captured).double().numpy()


def energy_confidence(logits: np.ndarray) -> np.ndarray:
    """``logsumexp(logits)``: the negated energy ``E = -logsumexp``, ``(B, C) -> (B,)``."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=1, keepdims=True)
    return (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))[:, 0]


def gradnorm_confidence(logits: np.ndarray, last_inputs: np.ndarray) -> np.ndarray:
    """GradNorm: ``|| d KL(u || softmax(z)) / dW ||_1`` per sample, ``(B,)``.

    With ``z = W h + b`` and ``u`` uniform over ``C`` classes,
    ``dKL/dz = softmax(z) - u``, so ``dKL/dW = (softmax(z) - u) h^T`` and its L1 norm is
    the product ``||softmax(z) - u||_1 * ||h||_1`` (Huang et al. 2021, section 3).
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)  # (B, C)
    uniform = 1.0 / logits.shape[1]
    return np.abs(probabilities - uniform).sum(axis=1) * np.abs(last_inputs).sum(axis=1)


def member_confidences(
    model: nn.Module, images: np.ndarray, config: BaselineConfig | None = None
) -> dict[str, np.ndarray]:
    """MC dropout, energy and GradNorm confidences of one member on uint8 images ``(B, 28, 28)``."""
    config = config or BaselineConfig()
    logits, last_inputs = _logits_and_last_inputs(model, images, config.batch_size)
    stochastic = mc_dropout_probabilities(
        model, images, config.mc_dropout_passes, config.batch_size, config.seed
    )
    return {
        "mc_dropout_entropy": -predictive_entropy(stochastic),
        "energy": energy_confidence(logits),
        "gradnorm": gradnorm_confidence(logits, last_inputs),
    }
