"""EMNIST digits and letters from the official gzip IDX files.

The official archive ``gzip.zip`` unpacks to a folder ``gzip/``; the files are looked
for in ``<data_dir>/emnist/gzip/`` and ``<data_dir>/emnist/`` (gzipped or not). EMNIST
stores every image transposed relative to MNIST, so the loader transposes them back.
Labels are as the files store them: digits 0-9, letters 1-26 (a/A = 1).
"""

from __future__ import annotations

from pathlib import Path

from training.data.base import Dataset, concatenate, find_file
from training.data.idx import load_idx_pair

EMNIST_SPLITS = ("digits", "letters")
EMNIST_PARTS = ("train", "test", "all")


def emnist_file_names(split: str) -> dict[str, tuple[str, str]]:
    """The official file names of one split: part -> (images, labels)."""
    if split not in EMNIST_SPLITS:
        raise ValueError(f"split must be one of {EMNIST_SPLITS}, got {split!r}")
    return {
        part: (
            f"emnist-{split}-{part}-images-idx3-ubyte.gz",
            f"emnist-{split}-{part}-labels-idx1-ubyte.gz",
        )
        for part in ("train", "test")
    }


def emnist_candidates(data_dir: Path, file_name: str) -> list[Path]:
    """Where an EMNIST file may be, in the order looked at."""
    folders = (Path(data_dir) / "emnist" / "gzip", Path(data_dir) / "emnist")
    unpacked = file_name.removesuffix(".gz")
    return [folder / name for name in (file_name, unpacked) for folder in folders]


def load_emnist(
    data_dir: Path, split: str = "digits", part: str = "all", *, verify: bool = True
) -> Dataset:
    """EMNIST ``digits`` or ``letters``; ``part`` ``train``, ``test`` or ``all`` (train first)."""
    files = emnist_file_names(split)
    if part not in EMNIST_PARTS:
        raise ValueError(f"part must be one of {EMNIST_PARTS}, got {part!r}")
    if part == "all":
        parts = [load_emnist(data_dir, split, p, verify=verify) for p in ("train", "test")]
        return concatenate(f"emnist-{split}", parts)
    image_file, label_file = files[part]
    return load_idx_pair(
        find_file(emnist_candidates(data_dir, image_file)),
        find_file(emnist_candidates(data_dir, label_file)),
        f"emnist-{split}-{part}",
        Path(data_dir),
        transpose=True,
        verify=verify,
    )
