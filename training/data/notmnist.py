"""notMNIST test set (letters A-J in many fonts) from gzip IDX in ``<data_dir>/notmnist/``.

Labels 0-9 stand for the letters A-J.
"""

from __future__ import annotations

from pathlib import Path

from training.data.base import Dataset
from training.data.idx import load_idx_pair

NOTMNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def load_notmnist(data_dir: Path, *, verify: bool = True) -> Dataset:
    directory = Path(data_dir) / "notmnist"
    image_file, label_file = NOTMNIST_FILES
    return load_idx_pair(
        directory / image_file, directory / label_file, "notmnist", Path(data_dir), verify=verify
    )
