"""Opt-in downloads of MNIST and EMNIST from their official locations, for users online.

Nothing in the pipeline downloads on its own: a user runs these once, then points the
data directory at the result. Each file is written to ``<name>.part``, its digest is
checked, and only then is it renamed into place, so an interrupted or corrupt download
never looks like data.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from training.data.base import DataError, resolve_data_dir
from training.data.checksums import OFFICIAL_MNIST_SHA256
from training.data.emnist import EMNIST_SPLITS, emnist_file_names
from training.data.mnist import MNIST_FILES

#: Mirrors of the official MNIST files, tried in order (yann.lecun.com refuses most
#: automated downloads nowadays; these two serve byte-identical files).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
#: The official EMNIST archive (NIST); it unpacks to a folder ``gzip/``.
EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
#: Only an MD5 is published for the EMNIST archive (torchvision checks the same one).
EMNIST_MD5 = "58c8d27c78d21e728a6bc7b3cc06412e"
#: Seconds to wait for a server before giving up on a mirror.
DOWNLOAD_TIMEOUT_S = 60
_CHUNK_BYTES = 1 << 20


def mnist_downloads() -> dict[str, str]:
    """File name -> expected SHA-256 of the four MNIST files."""
    names = [name for pair in MNIST_FILES.values() for name in pair]
    return {name: OFFICIAL_MNIST_SHA256[name] for name in names}


def emnist_members() -> list[str]:
    """The archive members the EMNIST loader needs (digits and letters, train and test)."""
    return [
        f"gzip/{name}"
        for split in EMNIST_SPLITS
        for pair in emnist_file_names(split).values()
        for name in pair
    ]


def download_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
    progress: bool = True,
) -> list[Path]:
    """Download the four MNIST files into ``<data_dir>/mnist/`` (skipping good ones)."""
    folder = resolve_data_dir(data_dir) / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sha256 in mnist_downloads().items():
        destination = folder / name
        if not (destination.is_file() and _digest(destination, "sha256") == sha256):
            errors = []
            for mirror in mirrors:
                try:
                    fetch(mirror + name, destination, sha256=sha256, progress=progress)
                    break
                except (urllib.error.URLError, OSError) as error:
                    errors.append(f"{mirror + name}: {error}")
            else:
                raise DataError(f"{destination}: every mirror failed: {'; '.join(errors)}")
        paths.append(destination)
    return paths


def download_emnist(
    data_dir: str | os.PathLike | None = None,
    *,
    url: str = EMNIST_URL,
    keep_archive: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Download EMNIST's ``gzip.zip`` (~560 MB) and unpack the digits and letters files
    into ``<data_dir>/emnist/gzip/``; the other splits are not needed and not unpacked."""
    folder = resolve_data_dir(data_dir) / "emnist"
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "gzip.zip"
    if not (archive.is_file() and _digest(archive, "md5") == EMNIST_MD5):
        fetch(url, archive, md5=EMNIST_MD5, progress=progress)
    paths = extract_emnist(archive, folder)
    if not keep_archive:
        archive.unlink()
    return paths


def extract_emnist(archive: Path, folder: Path) -> list[Path]:
    """Unpack the members the loader needs, by their exact names (never a path from the zip)."""
    paths = []
    try:
        with zipfile.ZipFile(archive) as handle:
            present = set(handle.namelist())
            for member in emnist_members():
                if member not in present:
                    raise DataError(f"{archive}: member {member} missing from the archive")
                destination = folder.joinpath(*member.split("/"))
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(handle.read(member))
                paths.append(destination)
    except zipfile.BadZipFile as error:
        raise DataError(f"{archive}: not a readable zip archive ({error})") from error
    return paths


def fetch(
    url: str,
    destination: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``destination`` and check the digest given (when one is known).

    Raises
    ------
    DataError
        The download's digest differs from the expected one (the partial file is removed).
    urllib.error.URLError
        The server cannot be reached.
    """
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            with open(partial, "wb") as handle:
                while chunk := response.read(_CHUNK_BYTES):
                    handle.write(chunk)
                    done += len(chunk)
                    if progress:
                        _report(url, done, total)
    except BaseException:
        partial.unlink(missing_ok=True)  # never leave half a file behind
        raise
    finally:
        if progress:
            print(file=sys.stderr)
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None and (actual := _digest(partial, algorithm)) != expected:
            partial.unlink()
            raise DataError(
                f"{destination}: {algorithm.upper()} mismatch after downloading {url}: "
                f"expected {expected}, got {actual}"
            )
    partial.replace(destination)
    return destination


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)  # integrity only
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _report(url: str, done: int, total: int) -> None:
    megabytes = done / 1e6
    if total:
        text = f"downloading {url}: {megabytes:.1f} / {total / 1e6:.1f} MB ({done / total:.0%})"
    else:
        text = f"downloading {url}: {megabytes:.1f} MB"
    print(f"\r{text}", end="", file=sys.stderr, flush=True)
