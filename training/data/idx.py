"""Parser for the IDX format of MNIST, EMNIST and notMNIST (optionally gzipped).

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
then one big-endian uint32 per dimension, then the data, row-major.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from training.data.base import DataError, Dataset, require_file
from training.data.checksums import checked_provenance

_UNSIGNED_BYTE = 0x08
#: Side of the images MNIST, EMNIST and notMNIST store.
IMAGE_SIDE = 28


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes into an array with ``expected_ndim`` dimensions."""
    path = require_file(Path(path))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot decompress ({error})") from error
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, shorter than the IDX header")
    zero, type_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code != _UNSIGNED_BYTE or ndim != expected_ndim:
        magic = int.from_bytes(raw[0:4], "big")
        expected = (_UNSIGNED_BYTE << 8) | expected_ndim
        raise DataError(
            f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected:08x} "
            f"(unsigned bytes, {expected_ndim} dimensions)"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{path}: truncated: {len(raw)} bytes, the header of {header_size} bytes is incomplete"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = header_size + int(np.prod(shape))
    if len(raw) != expected_bytes:
        kind = "truncated" if len(raw) < expected_bytes else "too long"
        raise DataError(
            f"{path}: {kind}: {len(raw)} bytes, the header {shape} needs {expected_bytes}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped when the name ends in .gz); tests and tools use it."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UNSIGNED_BYTE, array.ndim])
    header += b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


def load_idx_pair(
    image_path: Path,
    label_path: Path,
    name: str,
    data_dir: Path,
    *,
    transpose: bool = False,
    verify: bool = True,
) -> Dataset:
    """Images and labels from one pair of IDX files.

    ``transpose``: EMNIST stores each image transposed (column-major); MNIST and
    notMNIST do not. Files are hashed (and verified when known) before parsing.
    """
    provenance = [
        checked_provenance(image_path, data_dir, verify=verify),
        checked_provenance(label_path, data_dir, verify=verify),
    ]
    images = read_idx(image_path, expected_ndim=3)
    labels = read_idx(label_path, expected_ndim=1).astype(np.int64)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}"
        )
    if transpose:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))  # (N, 28, 28)
    return Dataset(name, images, labels, provenance)
