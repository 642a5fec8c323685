"""The paper's CNN (section 3 of the paper).

conv1 -> leaky ReLU -> max pool -> dropout
conv2 -> leaky ReLU -> max pool
conv3 -> dropout
flatten -> dense -> (softmax)

Layer names match :data:`scoring.features.LAYER_NAMES`; the explicit backward in
:mod:`training.scorer_graph` mirrors this forward pass layer by layer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scoring.engine import to_network_input
from scoring.features import IMAGE_SIZE, NUM_CLASSES
from training.config import ModelConfig


class PaperCNN(nn.Module):
    """Three 16-filter conv layers and a dense output per class, returning logits.

    ``num_classes`` is the data set's (10 for digits). It is an argument rather than a
    :class:`ModelConfig` field, so that the configuration members' checkpoints record
    stays what it was; the member record stores it beside the configuration.
    """

    def __init__(self, config: ModelConfig | None = None, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
        self.config = config or ModelConfig()
        self.num_classes = num_classes
        filters, kernel = self.config.filters, self.config.kernel_size
        padding = kernel // 2
        self.conv1 = nn.Conv2d(1, filters, kernel, stride=1, padding=padding)
        self.conv2 = nn.Conv2d(filters, filters, kernel, stride=1, padding=padding)
        self.conv3 = nn.Conv2d(filters, filters, kernel, stride=1, padding=padding)
        pooled = IMAGE_SIZE // 4
        self.dense = nn.Linear(filters * pooled * pooled, num_classes)
        self.dropout = nn.Dropout(self.config.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 1, 28, 28]`` scaled to [0, 1]."""
        return self.dense(self.penultimate(images))  # (B, num_classes)

    def penultimate(self, images: torch.Tensor) -> torch.Tensor:
        """The dense layer's input ``[B, 784]``: what the feature-space scores look at."""
        _, pooled2 = self.pooled_blocks(images)
        x = self.dropout(self.conv3(pooled2))  # (B, 16, 7, 7)
        return x.flatten(1)  # (B, 784)

    def pooled_blocks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled conv1 and conv2 activations ``(B, 16, 14, 14)`` and ``(B, 16, 7, 7)``."""
        slope = self.config.leaky_relu_slope
        pooled1 = F.max_pool2d(F.leaky_relu(self.conv1(images), slope), 2)  # (B, 16, 14, 14)
        x = self.dropout(pooled1)
        pooled2 = F.max_pool2d(F.leaky_relu(self.conv2(x), slope), 2)  # (B, 16, 7, 7)
        return pooled1, pooled2

    def channel_statistics(self, images: torch.Tensor) -> torch.Tensor:
        """Per-channel mean and standard deviation of both pooled blocks ``[B, 64]``.

        What the channel Mahalanobis score looks at (:func:`channel_statistics`).
        """
        return channel_statistics(*self.pooled_blocks(images))

    def l2_penalty(self) -> torch.Tensor:
        """Sum of squared weights (biases excluded), the paper's L2 regularization."""
        return sum((layer.weight**2).sum() for layer in self.layers().values())

    def layers(self) -> dict[str, nn.Module]:
        """The trainable layers by name, in forward order."""
        return {"conv1": self.conv1, "conv2": self.conv2, "conv3": self.conv3, "dense": self.dense}


def channel_statistics(*blocks: torch.Tensor) -> torch.Tensor:
    """``[mean_1, std_1, mean_2, std_2, ...]`` over the pixels of each channel of each block.

    Blocks ``(B, C, H, W)`` -> ``(B, 2 * C * len(blocks))``; the population standard
    deviation (divisor ``H * W``), as numpy's default.
    """
    parts = []
    for block in blocks:
        mean = block.mean(dim=(2, 3))  # (B, C)
        spread = (block - mean[..., None, None]).square().mean(dim=(2, 3)).sqrt()  # (B, C)
        parts += [mean, spread]
    return torch.cat(parts, dim=1)


def images_to_tensor(images) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` in [0, 1], the network input.

    The conversion is the engine's (:func:`scoring.engine.to_network_input`), so that
    training, the reference and the service feed the network the same numbers.
    """
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    return torch.from_numpy(to_network_input(np.asarray(images)))
