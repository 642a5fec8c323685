"""Omniglot handwritten characters, read straight from the official zip archives.

Archives in ``<data_dir>/omniglot/``: ``images_background.zip`` (30 alphabets) or, when
it is absent, its subset ``images_background_small1.zip`` (5 alphabets) - never both,
which would repeat images - plus ``images_evaluation.zip`` (20 alphabets) when present.
Members are ``<archive>/<Alphabet>/<characterNN>/<id>_<drawer>.png``: 105x105 1-bit,
black strokes on white. Each PNG goes through the service's own preprocessing
(``decode_image`` + ``prepare_image``: inverted to white on black, shrunk to 28x28 in
MNIST framing), so the pipeline sees what the service would see for that file.

Labels: the index of the (alphabet, character) pair within the chosen alphabets, both
sorted by name; for Latin alone, 0-25 are the letters a-z.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from scoring.preprocessing import ImageDecodeError, decode_image, prepare_image
from training.data.base import DataError, Dataset, MissingDataError, choose_indices
from training.data.checksums import checked_provenance

#: In order of preference for the background set; the first one present is used.
BACKGROUND_ARCHIVES = ("images_background.zip", "images_background_small1.zip")
EVALUATION_ARCHIVE = "images_evaluation.zip"
#: The alphabet that stands in for EMNIST letters (DESIGN.md section 4).
LATIN = "Latin"


@dataclass(frozen=True)
class _Member:
    archive: Path
    name: str  # path inside the archive
    alphabet: str
    character: str


def omniglot_archives(data_dir: Path) -> list[Path]:
    """The archives to read: one background archive and the evaluation archive if present."""
    folder = Path(data_dir) / "omniglot"
    background = [folder / name for name in BACKGROUND_ARCHIVES if (folder / name).is_file()]
    archives = background[:1]
    if (folder / EVALUATION_ARCHIVE).is_file():
        archives.append(folder / EVALUATION_ARCHIVE)
    if not archives:
        looked = ", ".join(str(folder / n) for n in (*BACKGROUND_ARCHIVES, EVALUATION_ARCHIVE))
        raise MissingDataError(f"{folder}: Omniglot archive not found (looked for {looked})")
    return archives


def _members(archive: Path, handle: zipfile.ZipFile) -> list[_Member]:
    members = []
    for name in handle.namelist():
        parts = PurePosixPath(name).parts
        if name.lower().endswith(".png") and len(parts) >= 3:
            members.append(_Member(archive, name, alphabet=parts[-3], character=parts[-2]))
    return members


def load_omniglot(
    data_dir: Path,
    alphabets: Collection[str] | None = None,
    *,
    exclude: Collection[str] = (),
    name: str = "omniglot",
    count: int | None = None,
    seed: int = 0,
    verify: bool = True,
) -> Dataset:
    """Images of the chosen alphabets (all when ``alphabets`` is None) minus ``exclude``.

    ``count`` draws that many images at random (``seed``) before decoding, which keeps
    the full 30+20-alphabet archives quick; labels keep the numbering of the full choice.
    """
    data_dir = Path(data_dir)
    provenance, chosen = [], []
    available: set[str] = set()
    with ExitStack() as stack:
        handles = {}
        for archive in omniglot_archives(data_dir):
            provenance.append(checked_provenance(archive, data_dir, verify=verify))
            try:
                handles[archive] = stack.enter_context(zipfile.ZipFile(archive))
                members = _members(archive, handles[archive])
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise DataError(f"{archive}: not a readable zip archive ({error})") from error
            available.update(member.alphabet for member in members)
            chosen += [
                member
                for member in members
                if (alphabets is None or member.alphabet in alphabets)
                and member.alphabet not in exclude
            ]
        if not chosen:
            raise DataError(
                f"{', '.join(str(a) for a in handles)}: no images of alphabets "
                f"{'any' if alphabets is None else sorted(alphabets)} "
                f"excluding {sorted(exclude)}; available: {sorted(available)}"
            )
        chosen.sort(key=lambda m: (m.alphabet, m.character, m.name))
        classes = {
            key: i for i, key in enumerate(sorted({(m.alphabet, m.character) for m in chosen}))
        }
        if count is not None:
            chosen = [chosen[i] for i in choose_indices(len(chosen), count, seed, name)]
        images = np.stack([_prepare_member(handles[m.archive], m) for m in chosen])
    labels = np.array([classes[(m.alphabet, m.character)] for m in chosen], dtype=np.int64)
    return Dataset(name, images, labels, provenance)


def _prepare_member(handle: zipfile.ZipFile, member: _Member) -> np.ndarray:
    try:
        return prepare_image(decode_image(handle.read(member.name)))
    except (ImageDecodeError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
        raise DataError(f"{member.archive}: member {member.name}: {error}") from error
