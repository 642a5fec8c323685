"""The one small interface every data source implements.

A source returns a :class:`Dataset`: uint8 images ``[N, 28, 28]`` in MNIST framing
(white strokes on black), integer labels where the set has them, and provenance
(which files it read and their SHA-256), so that a bundle can say exactly what it was
built from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Environment variable naming the data directory (the CLI flag ``--data-dir`` wins).
DATA_DIR_ENV = "GRADUNC_DATA_DIR"


class DataError(Exception):
    """A data file is missing, malformed, truncated or fails its checksum.

    The message always names the file and what is wrong with it.
    """


@dataclass(frozen=True)
class FileProvenance:
    path: str
    sha256: str


@dataclass
class Dataset:
    """Images of one concept, ready for the network."""

    name: str
    images: np.ndarray  # (N, 28, 28) uint8, white on black
    labels: np.ndarray | None  # (N,) int64, or None where the set has no labels
    provenance: list[FileProvenance] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (
            self.images.dtype != np.uint8
            or self.images.ndim != 3
            or self.images.shape[1:]
            != (
                28,
                28,
            )
        ):
            raise ValueError(
                f"Dataset {self.name!r}: images must be uint8 of shape (N, 28, 28), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(
                f"Dataset {self.name!r}: {len(self.labels)} labels for {len(self.images)} images"
            )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray, name: str | None = None) -> Dataset:
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(name or self.name, self.images[indices], labels, list(self.provenance))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance_of(path: Path) -> FileProvenance:
    return FileProvenance(path=path.name, sha256=sha256_of(path))


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else ``$GRADUNC_DATA_DIR``, else ``../shared/datasets``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir is None:
        data_dir = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
    return Path(data_dir)


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path
