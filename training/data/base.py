"""The one small interface every data source implements.

A source returns a :class:`Dataset`: uint8 images ``[N, 28, 28]`` in MNIST framing
(white strokes on black), integer labels where the set has them, and provenance
(which files it read and their SHA-256), so that a bundle can say exactly what it was
built from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scoring.bundle import file_sha256

#: Environment variable naming the data directory (the CLI flag ``--data-dir`` wins).
DATA_DIR_ENV = "GRADUNC_DATA_DIR"


class DataError(Exception):
    """A data file is missing, malformed, truncated or fails its checksum.

    The message always names the file and what is wrong with it.
    """


class MissingDataError(DataError):
    """A data file does not exist (``check_sources`` reports the source as not found)."""


@dataclass(frozen=True)
class FileProvenance:
    """One input file: its path relative to the data directory (or a description of a
    generated set) and the SHA-256 of its bytes."""

    path: str
    sha256: str


@dataclass
class Dataset:
    """Images of one concept, ready for the network."""

    name: str
    images: np.ndarray  # (N, 28, 28) uint8, white on black
    labels: np.ndarray | None  # (N,) int64, or None where the set has no labels
    provenance: list[FileProvenance] = field(default_factory=list)
    #: For a pooled known concept: its first ``num_train`` images are the official
    #: training set, the rest the official test set. None where there is no such split.
    num_train: int | None = None
    #: The name of each label (``class_names[label]``), where the set defines them: a
    #: user's ImageFolder takes them from its class folders. None: the labels are digits
    #: or the set has none.
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        shape_ok = self.images.ndim == 3 and self.images.shape[1:] == (28, 28)
        if self.images.dtype != np.uint8 or not shape_ok:
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


def concatenate(name: str, parts: Sequence[Dataset], num_train: int | None = None) -> Dataset:
    """Pool datasets in order; labels only when every part has them."""
    labels = None
    if all(part.labels is not None for part in parts):
        labels = np.concatenate([part.labels for part in parts])
    return Dataset(
        name,
        np.concatenate([part.images for part in parts]),
        labels,
        [provenance for part in parts for provenance in part.provenance],
        num_train=num_train,
    )


def choose_indices(total: int, count: int, seed: int, name: str) -> np.ndarray:
    """``count`` of ``total`` indices drawn without replacement (seeded), in ascending order,
    so a small subset still covers every class of a set stored class by class."""
    if not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if count > total:
        raise ValueError(f"count={count} is more than the {total} images of {name!r}")
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


sha256_of = file_sha256  # one implementation for data provenance and bundle hashes


def relative_name(path: Path, data_dir: Path | None = None) -> str:
    """``path`` relative to ``data_dir`` (``mnist/t10k-images-idx3-ubyte.gz``), so that
    provenance tells MNIST's and notMNIST's equally named files apart; else the name."""
    if data_dir is not None:
        try:
            return Path(path).resolve().relative_to(Path(data_dir).resolve()).as_posix()
        except ValueError:
            pass
    return Path(path).name


def provenance_of(path: Path, data_dir: Path | None = None) -> FileProvenance:
    return FileProvenance(path=relative_name(path, data_dir), sha256=sha256_of(path))


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else ``$GRADUNC_DATA_DIR``, else ``../shared/datasets``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir is None:
        data_dir = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
    return Path(data_dir)


def require_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise MissingDataError(f"{path}: file not found")
    return Path(path)


def find_file(candidates: Sequence[Path]) -> Path:
    """The first of ``candidates`` that exists: sets unpack into more than one layout."""
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise MissingDataError(f"{Path(candidates[0]).name}: file not found (looked for {tried})")
