"""Briefly trained members, shared by the test modules that need torch."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from training.model import PaperCNN, images_to_tensor


def train_briefly(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    learning_rate: float,
    seed: int,
    batch_size: int = 64,
) -> PaperCNN:
    """A few hundred SGD steps on real digits: typical (not random-init) gradients, and
    accurate enough to make mistakes. Returned in eval mode."""
    torch.manual_seed(seed)
    model = PaperCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    inputs, targets = images_to_tensor(images), torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
