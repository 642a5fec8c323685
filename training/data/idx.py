"""Parser for the IDX format of MNIST, EMNIST and notMNIST (optionally gzipped).

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
then one big-endian uint32 per dimension, then the data, row-major.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from training.data.base import DataError, require_file

_UNSIGNED_BYTE = 0x08


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes into an array with ``expected_ndim`` dimensions."""
    require_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
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
        raise DataError(f"{path}: truncated: the header of {header_size} bytes is incomplete")
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
