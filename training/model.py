"""The paper's CNN (section 3 of the paper).

conv1 -> leaky ReLU -> max pool -> dropout
conv2 -> leaky ReLU -> max pool
conv3 -> dropout
flatten -> dense -> (softmax)

Layer names match :data:`scoring.features.LAYER_NAMES`; the explicit backward in
:mod:`training.scorer_graph` mirrors this forward pass layer by layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from scoring.features import IMAGE_SIZE, NUM_CLASSES
from training.config import ModelConfig


class PaperCNN(nn.Module):
    """Three 16-filter conv layers and a dense 10-way output, returning logits."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        filters, kernel = self.config.filters, self.config.kernel_size
        padding = kernel // 2
        self.conv1 = nn.Conv2d(1, filters, kernel, stride=1, padding=padding)
        self.conv2 = nn.Conv2d(filters, filters, kernel, stride=1, padding=padding)
        self.conv3 = nn.Conv2d(filters, filters, kernel, stride=1, padding=padding)
        pooled = IMAGE_SIZE // 4
        self.dense = nn.Linear(filters * pooled * pooled, NUM_CLASSES)
        self.dropout = nn.Dropout(self.config.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 10]`` for images ``[B, 1, 28, 28]`` scaled to [0, 1]."""
        slope = self.config.leaky_relu_slope
        x = F.max_pool2d(F.leaky_relu(self.conv1(images), slope), 2)  # (B, 16, 14, 14)
        x = self.dropout(x)
        x = F.max_pool2d(F.leaky_relu(self.conv2(x), slope), 2)  # (B, 16, 7, 7)
        x = self.dropout(self.conv3(x))  # (B, 16, 7, 7)
        return self.dense(x.flatten(1))  # (B, 10)

    def l2_penalty(self) -> torch.Tensor:
        """Sum of squared weights (biases excluded), the paper's L2 regularization."""
        return sum((layer.weight**2).sum() for layer in self.layers().values())

    def layers(self) -> dict[str, nn.Module]:
        """The trainable layers by name, in forward order."""
        return {"conv1": self.conv1, "conv2": self.conv2, "conv3": self.conv3, "dense": self.dense}


def images_to_tensor(images) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` in [0, 1], the network input."""
    tensor = torch.as_tensor(images)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255.0)
    return tensor.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).float()
