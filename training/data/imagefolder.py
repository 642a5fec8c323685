"""A user's own data set: a folder with one subfolder per class (the ImageFolder layout).

Two layouts, told apart by the folder names::

    DIR/<class>/**/<image>                 the test split is drawn from each class:
                                           ``test_fraction`` of its images (seeded)
    DIR/train/<class>/**/<image>           an explicit official test split, as MNIST's
    DIR/test/<class>/**/<image>            t10k (the same class folders in both)

Class names are the class folders' names, sorted (label ``k`` is ``class_names[k]``).
Images are files with one of :data:`IMAGE_SUFFIXES` (any depth below the class folder;
other files and hidden folders are ignored), in any format, size and colour mode the
service accepts. Each goes through the service's own preprocessing
(:func:`scoring.preprocessing.prepare_files`, what ``POST /score`` runs), so the members
and the meta classifiers learn from exactly the 28x28 images the service will see.

The result is a pooled known concept like MNIST's: the official training images first,
then the test images, ``num_train`` marking the boundary, so the protocol's test /
calibration / member-pool splits (DESIGN.md section 4) apply unchanged.
:func:`fit_split_sizes` scales the default calibration and validation sizes to a small
set. :func:`load_image_files` reads a folder of images that are none of the classes (the
``--known-unknowns`` of a build), any layout.

Every problem is a :class:`~training.data.base.DataError` naming the folder or file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scoring.preprocessing import ImageDecodeError, prepare_files
from training.config import SplitConfig, TrainingConfig
from training.data.base import DataError, Dataset, FileProvenance, MissingDataError

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "IMAGE_SUFFIXES",
    "MIN_SPLIT_IMAGES",
    "SPLIT_FRACTION",
    "ImageFolderLayout",
    "fit_split_sizes",
    "load_image_files",
    "load_image_folder",
    "scan_image_folder",
]

#: File name endings read as images (case-insensitive): the formats of the HTTP contract.
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".webp",
)
#: Chosen default: without a test/ folder, this share of each class (at least one image)
#: becomes the official test split. MNIST's test set is 1/7 of its images; a little more
#: buys precision on the smaller sets users bring.
DEFAULT_TEST_FRACTION = 1 / 6
#: Seed of the drawn test split. Fixed, not the ensemble's seed, so that ensembles built
#: with different seeds are measured on the same test images.
TEST_SPLIT_SEED = 0
#: A set too small for the default calibration and validation sizes (10,000 each) gets
#: this share of its training images for each, as MNIST's 10,000 of 60,000 do.
SPLIT_FRACTION = 1 / 6
#: The fewest images a scaled calibration or validation split may have: fewer leave the
#: heads' three folds a handful of wrong predictions at best.
MIN_SPLIT_IMAGES = 30
TRAIN_FOLDER, TEST_FOLDER = "train", "test"
_SUFFIX_LIST = ", ".join(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ImageFolderLayout:
    """The files of an ImageFolder and the split each belongs to; nothing decoded yet."""

    root: Path
    class_names: list[str]
    train: list[tuple[Path, int]]  # (file, label), the official training part
    test: list[tuple[Path, int]]  # (file, label), the official test part
    explicit_test: bool  # True: from DIR/test/; False: drawn with test_fraction


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files at any depth below ``folder`` (hidden folders skipped), sorted."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(Path(directory) / name for name in files if _is_image(Path(name)))
    return sorted(found)


def _class_folders(folder: Path) -> dict[str, Path]:
    """Subfolders by name (sorted), after checking that no image lies beside them."""
    strays = sorted(path for path in folder.iterdir() if path.is_file() and _is_image(path))
    if strays:
        raise DataError(
            f"{strays[0]}: an image outside any class folder ({len(strays)} in {folder}); "
            "put every image into the subfolder named after its class"
        )
    return {
        path.name: path
        for path in sorted(folder.iterdir())
        if path.is_dir() and not path.name.startswith(".")
    }


def _classes_of(folder: Path) -> dict[str, list[Path]]:
    """Class name -> image files, with the checks every class folder must pass."""
    classes = _class_folders(folder)
    if not classes:
        raise DataError(
            f"{folder}: no class folders; the ImageFolder layout is one subfolder per class "
            f"holding its images, e.g. {folder / 'cat' / '0001.png'}"
        )
    if len(classes) == 1:
        (name,) = classes
        raise DataError(
            f"{folder}: only one class folder ({name!r}); a classifier needs at least two"
        )
    files = {}
    for name, path in classes.items():
        files[name] = _image_files(path)
        if not files[name]:
            raise DataError(
                f"{path}: class {name!r} holds no images (looked for {_SUFFIX_LIST}, "
                "in subfolders too)"
            )
    return files


def _check_folder(root: Path, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise MissingDataError(f"{root}: {what} folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: {what} must be a folder, this is a file")
    return root


def _drawn_test_count(count: int, fraction: float) -> int:
    """Test images of one class of ``count``: the rounded share, at least 1, leaving 1."""
    return min(max(int(round(count * fraction)), 1), count - 1)


def scan_image_folder(
    root: str | os.PathLike, test_fraction: float = DEFAULT_TEST_FRACTION
) -> ImageFolderLayout:
    """The classes, files and splits of an ImageFolder, checked; nothing is decoded.

    Parameters
    ----------
    root : the folder: ``root/<class>/...``, or ``root/train/<class>/...`` plus
        ``root/test/<class>/...``.
    test_fraction : float, default=DEFAULT_TEST_FRACTION
        Without a test/ folder: the share of each class (rounded, at least one image)
        drawn, seeded by :data:`TEST_SPLIT_SEED`, as the official test split.

    Raises
    ------
    DataError
        No class folder, a single class, an empty class, an image outside any class
        folder, train/ without test/ (or the reverse), different classes in train/ and
        test/, a class too small to give a test image.
    """
    root = _check_folder(Path(root), "data set")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")
    has_train, has_test = (root / TRAIN_FOLDER).is_dir(), (root / TEST_FOLDER).is_dir()
    if has_train or has_test:
        if not (has_train and has_test):
            there, missing = (
                (TRAIN_FOLDER, TEST_FOLDER) if has_train else (TEST_FOLDER, TRAIN_FOLDER)
            )
            raise DataError(
                f"{root}: has a {there}/ folder but no {missing}/ folder; give both "
                f"({TRAIN_FOLDER}/<class>/..., {TEST_FOLDER}/<class>/...) or neither (one "
                "folder per class; the test images are then drawn from each class)"
            )
        others = sorted(set(_class_folders(root)) - {TRAIN_FOLDER, TEST_FOLDER})
        if others:
            raise DataError(
                f"{root}: beside {TRAIN_FOLDER}/ and {TEST_FOLDER}/ there are other folders "
                f"({', '.join(others)}) that would not be read; move their images into "
                f"{TRAIN_FOLDER}/<class>/ or {TEST_FOLDER}/<class>/"
            )
        train_classes = _classes_of(root / TRAIN_FOLDER)
        test_classes = _classes_of(root / TEST_FOLDER)
        if set(train_classes) != set(test_classes):
            only_train = sorted(set(train_classes) - set(test_classes)) or ["none"]
            only_test = sorted(set(test_classes) - set(train_classes)) or ["none"]
            raise DataError(
                f"{root / TEST_FOLDER}: its class folders differ from {root / TRAIN_FOLDER}'s "
                f"(only in {TRAIN_FOLDER}/: {', '.join(only_train)}; only in {TEST_FOLDER}/: "
                f"{', '.join(only_test)}); both need the same classes"
            )
        names = sorted(train_classes)
        train = [(path, k) for k, name in enumerate(names) for path in train_classes[name]]
        test = [(path, k) for k, name in enumerate(names) for path in test_classes[name]]
        return ImageFolderLayout(root, names, train, test, explicit_test=True)

    classes = _classes_of(root)
    names = sorted(classes)
    train, test = [], []
    rng = np.random.default_rng(TEST_SPLIT_SEED)
    for k, name in enumerate(names):
        files = classes[name]
        if len(files) < 2:
            raise DataError(
                f"{root / name}: class {name!r} has 1 image; drawing a test split needs at "
                "least 2 per class (one to train on, one to test on)"
            )
        chosen = set(rng.permutation(len(files))[: _drawn_test_count(len(files), test_fraction)])
        train += [(path, k) for i, path in enumerate(files) if i not in chosen]
        test += [(path, k) for i, path in enumerate(files) if i in chosen]
    return ImageFolderLayout(root, names, train, test, explicit_test=False)


def _read_images(files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Each file through the service's preprocessing; also each file's SHA-256."""
    images = np.empty((len(files), 28, 28), dtype=np.uint8)
    digests = []
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from error
        try:
            images[i] = prepare_files([data])[0]
        except ImageDecodeError as error:
            raise DataError(f"{path}: not a readable image: {error}") from error
        digests.append(hashlib.sha256(data).hexdigest())
    return images, digests


def _folder_provenance(root: Path, folder: Path, files: list[Path], digests: list[str]):
    """One provenance entry per folder: SHA-256 over its files' relative paths and hashes.

    One line per folder rather than per file keeps a manifest of 70,000 images readable;
    the digest still changes when any file is added, removed, renamed or altered.
    """
    listing = hashlib.sha256()
    for path, digest in zip(files, digests, strict=True):
        listing.update(f"{path.relative_to(folder).as_posix()}\0{digest}\n".encode())
    relative = Path(Path(os.path.abspath(root)).name) / folder.relative_to(root)
    return FileProvenance(
        path=f"{relative.as_posix()}/ ({len(files)} images)",
        sha256=listing.hexdigest(),
    )


def load_image_folder(
    root: str | os.PathLike,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    *,
    name: str = "user_dataset",
) -> Dataset:
    """A user's ImageFolder as a pooled known concept (official train first, then test).

    Parameters
    ----------
    root, test_fraction : as in :func:`scan_image_folder`.
    name : str, default="user_dataset"
        The dataset's name in the manifest's data provenance.

    Returns
    -------
    Dataset with images uint8 ``(N, 28, 28)``, labels indexing ``class_names`` (the
    sorted class folder names), ``num_train`` official training images first, and one
    provenance entry per class folder.

    Raises
    ------
    DataError
        What :func:`scan_image_folder` raises, and an unreadable image (named).
    """
    layout = scan_image_folder(root, test_fraction)
    files = [path for path, _ in layout.train + layout.test]
    images, digests = _read_images(files)
    labels = np.array([label for _, label in layout.train + layout.test], dtype=np.int64)
    # One provenance entry per class folder (per part with an explicit test/ folder).
    by_folder: dict[Path, tuple[list[Path], list[str]]] = {}
    parts = [(TRAIN_FOLDER, layout.train), (TEST_FOLDER, layout.test)]
    rows = (item for part, items in parts for item in ((part, f, k) for f, k in items))
    for (part, path, label), digest in zip(rows, digests, strict=True):
        class_name = layout.class_names[label]
        folder = (
            layout.root / part / class_name if layout.explicit_test else layout.root / class_name
        )
        paths, hashes = by_folder.setdefault(folder, ([], []))
        paths.append(path)
        hashes.append(digest)
    provenance = [
        _folder_provenance(layout.root, folder, paths, hashes)
        for folder, (paths, hashes) in sorted(by_folder.items())
    ]
    return Dataset(
        name,
        images,
        labels,
        provenance,
        num_train=len(layout.train),
        class_names=list(layout.class_names),
    )


def load_image_files(root: str | os.PathLike, *, name: str = "user_known_unknowns") -> Dataset:
    """Every image below ``root`` (any layout), unlabelled: images that are none of the
    classes, for the p_ood head's known unknowns.

    Raises
    ------
    DataError
        The folder is missing or holds no image, or an image is unreadable (named).
    """
    root = _check_folder(Path(root), "known-unknowns")
    files = _image_files(root)
    if not files:
        raise DataError(f"{root}: no images (looked for {_SUFFIX_LIST}, in subfolders too)")
    images, digests = _read_images(files)
    return Dataset(name, images, None, [_folder_provenance(root, root, files, digests)])


def fit_split_sizes(config: TrainingConfig, num_train: int, source: str) -> TrainingConfig:
    """``config`` with the calibration and validation sizes fitted to ``num_train``.

    A size left at its default (15,000 and 5,000) on a set too small for them becomes
    :data:`SPLIT_FRACTION` of the training images, MNIST's proportions; a size set to
    anything else is kept. ``source`` names the data set in the errors.

    Raises
    ------
    DataError
        The sizes leave no member training images, or a scaled split would be smaller
        than :data:`MIN_SPLIT_IMAGES`; the message says which ``--set`` to change.
    """
    split, defaults = config.split, SplitConfig()
    if split.calibration_size + split.validation_size < num_train:
        return config
    scaled = max(int(num_train * SPLIT_FRACTION), 0)
    changes = {
        field: min(getattr(defaults, field), scaled)
        for field in ("calibration_size", "validation_size")
        if getattr(split, field) == getattr(defaults, field)
    }
    fitted = dataclasses.replace(split, **changes)
    suggestion = max(num_train // 6, 1)
    advice = (
        f"add images, or lower the sizes, e.g. --set split.calibration_size={suggestion} "
        f"--set split.validation_size={suggestion}"
    )
    if changes and scaled < MIN_SPLIT_IMAGES:
        raise DataError(
            f"{source}: {num_train} official training images are too few: the calibration "
            f"and validation splits take 1/6 of them each and need at least "
            f"{MIN_SPLIT_IMAGES} images each, so at least {6 * MIN_SPLIT_IMAGES} training "
            "images (test images not counted); or set the sizes yourself, e.g. "
            f"--set split.calibration_size={suggestion} --set split.validation_size={suggestion}"
        )
    if fitted.calibration_size + fitted.validation_size >= num_train:
        raise DataError(
            f"{source}: {num_train} official training images are too few for "
            f"split.calibration_size={fitted.calibration_size} plus "
            f"split.validation_size={fitted.validation_size}, which leave no image for the "
            f"members to train on; {advice}"
        )
    return dataclasses.replace(config, split=fitted)
