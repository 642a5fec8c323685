"""MNIST from its four official gzip IDX files: the known concept."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.base import DataError, Dataset, provenance_of
from training.data.idx import read_idx

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_idx_pair(
    directory: Path, image_file: str, label_file: str, name: str, transpose: bool = False
) -> Dataset:
    """Images and labels from one pair of IDX files; EMNIST stores images transposed."""
    image_path, label_path = directory / image_file, directory / label_file
    images = read_idx(image_path, expected_ndim=3)
    labels = read_idx(label_path, expected_ndim=1).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DataError(
            f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}"
        )
    if transpose:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return Dataset(name, images, labels, [provenance_of(image_path), provenance_of(label_path)])


def load_mnist(data_dir: Path, split: str = "all") -> Dataset:
    """MNIST ``train``, ``test`` or ``all`` (70,000 images pooled, train first)."""
    directory = Path(data_dir) / "mnist"
    if split in MNIST_FILES:
        return load_idx_pair(directory, *MNIST_FILES[split], name=f"mnist-{split}")
    if split != "all":
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    parts = [
        load_idx_pair(directory, *MNIST_FILES[s], name=f"mnist-{s}") for s in ("train", "test")
    ]
    return Dataset(
        "mnist",
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        [prov for p in parts for prov in p.provenance],
    )
