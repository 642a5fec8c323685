"""Shared fixtures: the real data directory, skipped with a reason where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data.base import resolve_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / "models" / "default"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/datasets (or $GRADUNC_DATA_DIR); tests that need it skip when it is absent."""
    path = resolve_data_dir()
    if not (path / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real data sets not found in {path} (set GRADUNC_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def mnist_pooled(data_dir):
    from training.data.mnist import load_mnist

    return load_mnist(data_dir)
