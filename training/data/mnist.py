"""MNIST from its four official gzip IDX files in ``<data_dir>/mnist/``: the known concept."""

from __future__ import annotations

from pathlib import Path

from training.data.base import Dataset, concatenate
from training.data.idx import load_idx_pair

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_SPLITS = ("train", "test", "all")


def load_mnist(data_dir: Path, split: str = "all", *, verify: bool = True) -> Dataset:
    """MNIST ``train``, ``test`` or ``all`` (70,000 images pooled, train first;
    ``num_train`` marks where the official test set begins).

    Labels are the digits 0-9. ``verify`` checks the SHA-256 of known files.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    if split != "all":
        image_file, label_file = MNIST_FILES[split]
        directory = data_dir / "mnist"
        return load_idx_pair(
            directory / image_file,
            directory / label_file,
            f"mnist-{split}",
            data_dir,
            verify=verify,
        )
    train, test = (load_mnist(data_dir, part, verify=verify) for part in ("train", "test"))
    return concatenate("mnist", [train, test], num_train=len(train))
