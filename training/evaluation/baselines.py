"""The torch half of the paper-level baselines: what needs one member's model.

- :func:`mc_dropout_probabilities` - MC dropout (Gal and Ghahramani 2016): ``T``
  stochastic passes with the CNN's dropout layers active.
- :func:`logits_and_last_inputs` - eval-mode logits and the dense layer's inputs, from
  which the energy score (Liu et al. 2020) and GradNorm follow.
- :func:`gradnorm_confidence` - GradNorm (Huang et al. 2021): the L1 norm of the gradient
  of ``KL(uniform || softmax(logits))`` with respect to the last layer's weights.

The scores built on them, and the deep-ensemble scores that need only probabilities,
are in :mod:`training.evaluation.paper_scores`; their maths in numpy is in
:mod:`scoring.scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.model import images_to_tensor

__all__ = [
    "BaselineConfig",
    "gradnorm_confidence",
    "logits_and_last_inputs",
    "mc_dropout_probabilities",
]


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
def logits_and_last_inputs(
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
