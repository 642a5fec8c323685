"""Shared helpers of the data and preprocessing tests (not fixtures: plain functions).

Image files, real and forged, come from :mod:`tools.harness`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data.base import resolve_data_dir


def shared_data_dir(*required: str) -> Path:
    """The real data directory, or skip the test when it (or a required entry) is absent."""
    data_dir = resolve_data_dir()
    for entry in required or ("",):
        if not (data_dir / entry).exists():
            pytest.skip(
                f"real data not available: {data_dir / entry} is missing "
                "(set GRADUNC_DATA_DIR to a folder laid out like ../shared/datasets)"
            )
    return data_dir


def plus_sign(size: int = 120, ink: int = 0, background: int = 255) -> np.ndarray:
    """A thick, off-centre, asymmetric plus on a plain background: a stand-in digit."""
    canvas = np.full((size, size), background, dtype=np.uint8)
    canvas[size // 5 : size * 3 // 4, size * 2 // 5 : size // 2] = ink  # vertical bar
    canvas[size * 2 // 5 : size // 2, size // 6 : size * 2 // 3] = ink  # horizontal bar
    return canvas


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])
