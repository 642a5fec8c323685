"""Briefly trained members and ready servers, shared by the test modules."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from app.loopback import LoopbackServer
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


def wait_until_ready(server: LoopbackServer, timeout_s: float) -> LoopbackServer:
    """Poll /readyz until the bundle is loaded; fail the test if loading fails or stalls."""
    deadline = time.monotonic() + timeout_s
    while (ready := httpx.get(server.url + "/readyz")).status_code != 200:
        if ready.json().get("state") == "failed" or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"the bundle did not load: {ready.json()['detail']}")
        time.sleep(0.05)
    return server
