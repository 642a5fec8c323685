"""The registry of data sources: one name per concept the pipeline evaluates.

``load_source(name)`` returns a :class:`Dataset`; ``check_sources()`` reports which
sources a data directory holds (the ``data check`` command). File sources read from
``resolve_data_dir(data_dir)``; the noise sources need no files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from training.data.base import (
    DataError,
    Dataset,
    FileProvenance,
    MissingDataError,
    choose_indices,
    resolve_data_dir,
)
from training.data.cifar10 import load_cifar10
from training.data.emnist import load_emnist
from training.data.mnist import load_mnist
from training.data.noise import DEFAULT_NOISE_COUNT, normal_noise, uniform_noise
from training.data.notmnist import load_notmnist
from training.data.omniglot import LATIN, load_omniglot

# A file loader takes (data_dir, verify=...) and returns the whole set.
_FileLoader = Callable[..., Dataset]

_FILE_SOURCES: dict[str, _FileLoader] = {
    "mnist": partial(load_mnist, split="all"),
    "mnist-train": partial(load_mnist, split="train"),
    "mnist-test": partial(load_mnist, split="test"),
    "emnist-digits": partial(load_emnist, split="digits"),
    "emnist-letters": partial(load_emnist, split="letters"),
    "notmnist": load_notmnist,
}
_OMNIGLOT_SOURCES = {
    "omniglot-latin": {"alphabets": (LATIN,)},
    "omniglot-other": {"exclude": (LATIN,)},
}
_NOISE_SOURCES = {"uniform-noise": uniform_noise, "normal-noise": normal_noise}

#: Every name :func:`load_source` accepts.
SOURCE_NAMES: tuple[str, ...] = (
    "mnist",
    "mnist-train",
    "mnist-test",
    "emnist-digits",
    "emnist-letters",
    "notmnist",
    "omniglot-latin",
    "omniglot-other",
    "cifar10",
    "uniform-noise",
    "normal-noise",
)


def load_source(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    count: int | None = None,
    verify: bool = True,
) -> Dataset:
    """Load one source by name.

    Parameters
    ----------
    name : one of :data:`SOURCE_NAMES`.
    data_dir : the data directory; default ``$GRADUNC_DATA_DIR``, else ``../shared/datasets``.
    seed : seeds the noise generators and the subset drawn when ``count`` is given.
    count : noise: how many images to generate (default ``DEFAULT_NOISE_COUNT``); file
        sources: a random subset of that many images, in file order (default all).
    verify : check the SHA-256 of known files (``checksums.KNOWN_SHA256``); pass False
        for a different but valid copy of a known file.

    Returns
    -------
    Dataset named ``name``: images uint8 ``(N, 28, 28)`` white on black, labels or None.
    """
    if name not in SOURCE_NAMES:
        raise ValueError(f"unknown data source {name!r}; valid: {', '.join(SOURCE_NAMES)}")
    if name in _NOISE_SOURCES:
        return _NOISE_SOURCES[name](DEFAULT_NOISE_COUNT if count is None else count, seed)
    directory = resolve_data_dir(data_dir)
    # These two draw the subset before preprocessing, which is most of their cost.
    if name in _OMNIGLOT_SOURCES:
        return load_omniglot(
            directory, **_OMNIGLOT_SOURCES[name], name=name, count=count, seed=seed, verify=verify
        )
    if name == "cifar10":
        return load_cifar10(directory, count=count, seed=seed, verify=verify)
    dataset = _FILE_SOURCES[name](directory, verify=verify)
    dataset.name = name
    if count is not None:
        dataset = dataset.subset(choose_indices(len(dataset), count, seed, name))
    return dataset


@dataclass
class SourceCheck:
    """What ``data check`` reports for one source."""

    name: str
    found: bool  # False when a file is missing; True with an error when one is broken
    count: int = 0
    files: list[FileProvenance] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.found and self.error is None

    def to_dict(self) -> dict:
        """JSON-ready, for ``data check --json``."""
        return {
            "name": self.name,
            "found": self.found,
            "ok": self.ok,
            "count": self.count,
            "files": [{"path": f.path, "sha256": f.sha256} for f in self.files],
            "error": self.error,
        }


def check_sources(
    data_dir: str | os.PathLike | None = None, *, verify: bool = True
) -> list[SourceCheck]:
    """Load every source once and report what was found; never raises a ``DataError``."""
    directory: Path = resolve_data_dir(data_dir)
    checks = []
    for name in SOURCE_NAMES:
        try:
            dataset = load_source(name, directory, verify=verify)
        except MissingDataError as error:
            checks.append(SourceCheck(name, found=False, error=str(error)))
        except DataError as error:
            checks.append(SourceCheck(name, found=True, error=str(error)))
        else:
            checks.append(SourceCheck(name, True, len(dataset), list(dataset.provenance)))
    return checks
