"""Known SHA-256 of data files, and the check that loaders run before parsing a file.

Keys are paths relative to the data directory, because MNIST and notMNIST share file
names. A file is verified only when its key is in :data:`KNOWN_SHA256` and the caller
asks for verification (the default); a user's own files under other names are never
checked. Several hashes may be accepted for one key: the official release and the
project's shared copy differ (the shared MNIST files were re-gzipped, which changes the
bytes but not the images). A user with yet another valid copy (for example the official
CIFAR-10 binary release, which the shared JPEG-derived copy is not) loads it with
``verify=False``, or ``--no-verify`` on the command line.
"""

from __future__ import annotations

from pathlib import Path

from training.data.base import DataError, FileProvenance, provenance_of, require_file

#: The official MNIST gzip files (as served by the mirrors in ``download.py``), in
#: ``sha256sum`` format.
_OFFICIAL_MNIST = """
440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609  train-images-idx3-ubyte.gz
3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c  train-labels-idx1-ubyte.gz
8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6  t10k-images-idx3-ubyte.gz
f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6  t10k-labels-idx1-ubyte.gz
"""

#: The project's shared copies, as listed in ../shared/datasets/README.md.
_SHARED_COPIES = """
0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971  mnist/train-images-idx3-ubyte.gz
1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203  mnist/train-labels-idx1-ubyte.gz
1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be  mnist/t10k-images-idx3-ubyte.gz
b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b  mnist/t10k-labels-idx1-ubyte.gz
70ae9e06201f2827e5b0a3781a3169d735dd2efc69996b9eeaee7f10ed4044d7  notmnist/t10k-images-idx3-ubyte.gz
1fa03836e01c862542f8eb83463bb951bebec6fcb3efa28dad748c6b38a9021b  notmnist/t10k-labels-idx1-ubyte.gz
f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4  omniglot/images_background_small1.zip
18fde75bb6b08389d237f73ff3863b75b88eb8920dadf3900bc92e4e644e6545  cifar10/cifar-10-batches-bin/test_batch.bin
"""  # noqa: E501 - sha256sum lines, kept whole so they can be compared


def _parse_sha256sum(text: str) -> dict[str, str]:
    return {name: digest for digest, name in (line.split() for line in text.split("\n") if line)}


#: File name -> SHA-256 of the official MNIST files; ``download.py`` checks downloads with it.
OFFICIAL_MNIST_SHA256 = _parse_sha256sum(_OFFICIAL_MNIST)
SHARED_COPY_SHA256 = _parse_sha256sum(_SHARED_COPIES)


def _known_table() -> dict[str, tuple[str, ...]]:
    table = {key: (digest,) for key, digest in SHARED_COPY_SHA256.items()}
    for name, digest in OFFICIAL_MNIST_SHA256.items():
        table[f"mnist/{name}"] = (*table.get(f"mnist/{name}", ()), digest)
    return table


#: Relative path -> every SHA-256 accepted for it.
KNOWN_SHA256: dict[str, tuple[str, ...]] = _known_table()


def checked_provenance(path: Path, data_dir: Path, *, verify: bool = True) -> FileProvenance:
    """Hash ``path`` for provenance and, when it is a known file, check the hash.

    Raises
    ------
    DataError
        The file is known and its SHA-256 is none of the accepted ones; the message names
        the file, the expected and the actual hash, and how to load a different valid copy.
    """
    provenance = provenance_of(require_file(path), data_dir)
    expected = KNOWN_SHA256.get(provenance.path)
    if verify and expected is not None and provenance.sha256 not in expected:
        raise DataError(
            f"{path}: SHA-256 mismatch: expected {' or '.join(expected)}, "
            f"got {provenance.sha256}. The file is damaged or a different copy; if it is a "
            "different but valid copy, skip the check with --no-verify (python -m training "
            "data-check, train, build) or verify=False (load_source, load_mnist, ...)"
        )
    return provenance
