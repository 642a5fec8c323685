"""The IDX parser and the IDX-based loaders on files the tests write."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest

from training.data.base import DataError, MissingDataError
from training.data.emnist import load_emnist
from training.data.idx import load_idx_pair, read_idx, write_idx
from training.data.mnist import load_mnist
from training.data.notmnist import load_notmnist


def asymmetric_images(count: int = 3) -> np.ndarray:
    """Images that differ from their transpose, so a missed or extra transpose shows."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for index in range(count):
        images[index, 2 + index, :] = 200  # a horizontal line, a different row each
        images[index, 5:20, 3] = 100 + index  # a short vertical line
    return images


def write_pair(folder, image_name, label_name, images, labels) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / image_name, images)
    write_idx(folder / label_name, labels)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip_plain_and_gzipped(tmp_path, name):
    images = asymmetric_images()
    write_idx(tmp_path / name, images)
    np.testing.assert_array_equal(read_idx(tmp_path / name, expected_ndim=3), images)


def test_gzip_is_decided_by_the_suffix(tmp_path):
    write_idx(tmp_path / "labels.gz", np.arange(5, dtype=np.uint8))
    assert gzip.decompress((tmp_path / "labels.gz").read_bytes())[:4] == bytes([0, 0, 8, 1])


def test_mnist_is_not_transposed(tmp_path):
    images, labels = asymmetric_images(), np.array([3, 1, 4], dtype=np.uint8)
    for image_file, label_file in [
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ]:
        write_pair(tmp_path / "mnist", image_file, label_file, images, labels)
    dataset = load_mnist(tmp_path, "all", verify=False)
    np.testing.assert_array_equal(dataset.images, np.concatenate([images, images]))
    assert dataset.labels.dtype == np.int64
    assert dataset.labels.tolist() == [3, 1, 4, 3, 1, 4]
    assert [p.path for p in dataset.provenance][0] == "mnist/train-images-idx3-ubyte.gz"


@pytest.mark.parametrize("folder", ["emnist/gzip", "emnist"])
@pytest.mark.parametrize("split", ["digits", "letters"])
def test_emnist_is_transposed_back(tmp_path, folder, split):
    images = asymmetric_images()
    stored = images.transpose(0, 2, 1)  # EMNIST's own storage order
    for part in ("train", "test"):
        write_pair(
            tmp_path / folder,
            f"emnist-{split}-{part}-images-idx3-ubyte.gz",
            f"emnist-{split}-{part}-labels-idx1-ubyte.gz",
            stored,
            np.array([1, 2, 26], dtype=np.uint8),
        )
    dataset = load_emnist(tmp_path, split)
    assert dataset.name == f"emnist-{split}"
    np.testing.assert_array_equal(dataset.images, np.concatenate([images, images]))
    assert dataset.labels.tolist() == [1, 2, 26] * 2
    test_only = load_emnist(tmp_path, split, "test")
    np.testing.assert_array_equal(test_only.images, images)


def test_emnist_unpacked_files_are_accepted(tmp_path):
    images = asymmetric_images()
    write_pair(
        tmp_path / "emnist" / "gzip",
        "emnist-digits-test-images-idx3-ubyte",
        "emnist-digits-test-labels-idx1-ubyte",
        images.transpose(0, 2, 1),
        np.array([0, 1, 2], dtype=np.uint8),
    )
    np.testing.assert_array_equal(load_emnist(tmp_path, "digits", "test").images, images)


def test_emnist_missing_names_the_file_and_where_it_looked(tmp_path):
    with pytest.raises(MissingDataError, match="emnist-letters-train-images-idx3-ubyte.gz") as info:
        load_emnist(tmp_path, "letters")
    assert str(tmp_path / "emnist" / "gzip") in str(info.value)


def test_emnist_rejects_an_unknown_split(tmp_path):
    with pytest.raises(ValueError, match=re.escape("split must be one of ('digits', 'letters')")):
        load_emnist(tmp_path, "balanced")


def test_notmnist_loads_from_its_folder(tmp_path):
    images = asymmetric_images()
    write_pair(
        tmp_path / "notmnist",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        images,
        np.array([0, 9, 5], dtype=np.uint8),
    )
    dataset = load_notmnist(tmp_path, verify=False)
    np.testing.assert_array_equal(dataset.images, images)
    assert dataset.labels.tolist() == [0, 9, 5]


# --- malformed files: every error is a DataError naming the file ---------------------


def write_raw(path, raw: bytes):
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def header(ndim: int, *shape: int, type_code: int = 8) -> bytes:
    return bytes([0, 0, type_code, ndim]) + b"".join(s.to_bytes(4, "big") for s in shape)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("raw", "expected_ndim", "message"),
    [
        (header(3, 1, 2, 2, type_code=0x0D) + bytes(4), 3, "wrong IDX magic number 0x00000d03"),
        (b"\x01\x00" + header(3, 1, 2, 2)[2:] + bytes(4), 3, "wrong IDX magic number"),
        (header(1, 4) + bytes(4), 3, "expected 0x00000803 (unsigned bytes, 3 dimensions)"),
        (b"\x00\x00", 1, "truncated: 2 bytes, shorter than the IDX header"),
        (header(3, 1, 2, 2)[:9], 3, "the header of 16 bytes is incomplete"),
        (header(3, 2, 2, 2) + bytes(7), 3, "truncated: 23 bytes, the header (2, 2, 2) needs 24"),
        (header(1, 3) + bytes(4), 1, "too long: 12 bytes, the header (3,) needs 11"),
    ],
)
def test_malformed_file_errors_name_the_file(tmp_path, suffix, raw, expected_ndim, message):
    path = write_raw(tmp_path / f"broken-idx{suffix}", raw)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        read_idx(path, expected_ndim=expected_ndim)


def test_missing_file(tmp_path):
    path = tmp_path / "absent-idx3-ubyte.gz"
    with pytest.raises(MissingDataError, match=re.escape(f"{path}: file not found")):
        read_idx(path, expected_ndim=3)


@pytest.mark.parametrize(
    "raw",
    [b"this is not gzip data at all", gzip.compress(header(1, 100) + bytes(100))[:-12]],
    ids=["not-gzip", "cut-gzip"],
)
def test_bad_gzip(tmp_path, raw):
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot decompress")):
        read_idx(path, expected_ndim=1)


def test_pair_with_mismatched_counts(tmp_path):
    write_pair(tmp_path, "images.gz", "labels.gz", asymmetric_images(3), np.zeros(2, np.uint8))
    with pytest.raises(DataError, match=re.escape("labels.gz: 2 labels for 3 images in images.gz")):
        load_idx_pair(tmp_path / "images.gz", tmp_path / "labels.gz", "pair", tmp_path)


def test_pair_with_wrong_image_size(tmp_path):
    write_pair(tmp_path, "images.gz", "labels.gz", np.zeros((2, 32, 32), np.uint8), np.zeros(2))
    with pytest.raises(DataError, match=re.escape("images.gz: images are 32x32, expected 28x28")):
        load_idx_pair(tmp_path / "images.gz", tmp_path / "labels.gz", "pair", tmp_path)
