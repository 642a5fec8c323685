"""The data sources: real files in the shared data directory, and files the tests write."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import urllib.request
import zipfile

import numpy as np
import pytest
from helpers_data import plus_sign, shared_data_dir
from PIL import Image

from scoring.preprocessing import prepare_array
from tools.harness import encode
from training.data.base import DataError, MissingDataError, choose_indices
from training.data.checksums import KNOWN_SHA256, OFFICIAL_MNIST_SHA256, SHARED_COPY_SHA256
from training.data.cifar10 import RECORD_BYTES, load_cifar10, read_cifar_batch
from training.data.download import (
    EMNIST_URL,
    MNIST_MIRRORS,
    emnist_members,
    extract_emnist,
    fetch,
    mnist_downloads,
)
from training.data.emnist import load_emnist
from training.data.idx import write_idx
from training.data.mnist import MNIST_FILES
from training.data.noise import NORMAL_NOISE_STD, normal_noise, uniform_noise
from training.data.omniglot import load_omniglot
from training.data.sources import SOURCE_NAMES, check_sources, load_source

# name, folder it needs, image count, label range (None: unlabelled)
REAL_SOURCES = [
    ("mnist", "mnist", 70_000, (0, 9)),
    ("mnist-train", "mnist", 60_000, (0, 9)),
    ("mnist-test", "mnist", 10_000, (0, 9)),
    ("notmnist", "notmnist", 10_000, (0, 9)),
    ("omniglot-latin", "omniglot", 520, (0, 25)),
    ("omniglot-other", "omniglot", 2_200, (0, 109)),
    ("cifar10", "cifar10", 10_000, (0, 9)),
]
# Sources whose every image is framed white on black (notMNIST glyphs fill the frame).
WHITE_ON_BLACK = ["mnist-test", "omniglot-latin", "omniglot-other", "cifar10"]


def border_mean(images: np.ndarray) -> float:
    ring = np.concatenate(
        [images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1
    )
    return float(ring.mean())


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def load(name: str):
        if name not in cache:
            folder = next(folder for source, folder, *_ in REAL_SOURCES if source == name)
            cache[name] = load_source(name, shared_data_dir(folder))
        return cache[name]

    return load


# --- real files -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "folder", "count", "label_range"), REAL_SOURCES)
def test_real_source_loads(loaded, name, folder, count, label_range):
    dataset = loaded(name)
    assert dataset.name == name
    assert dataset.images.shape == (count, 28, 28) and dataset.images.dtype == np.uint8
    assert dataset.images.max() == 255 and dataset.images.min() == 0
    assert dataset.labels.dtype == np.int64
    assert (dataset.labels.min(), dataset.labels.max()) == label_range
    for provenance in dataset.provenance:
        assert provenance.path.startswith(f"{folder}/")
        assert provenance.sha256 == SHARED_COPY_SHA256[provenance.path]


@pytest.mark.parametrize("name", WHITE_ON_BLACK)
def test_real_source_is_white_on_black_and_a_fixed_point(loaded, name):
    images = loaded(name).images
    assert border_mean(images) < 1.0  # MNIST's own border mean is 0.04
    assert images.mean() < 60
    # What the pipeline trains on is what the service computes for the same 28x28 file.
    for image in images[:: max(1, len(images) // 300)]:
        np.testing.assert_array_equal(prepare_array(image), image)


def test_omniglot_latin_has_26_letters_by_20_drawers(loaded):
    assert np.bincount(loaded("omniglot-latin").labels).tolist() == [20] * 26


def test_cifar_classes_are_balanced(loaded):
    assert np.bincount(loaded("cifar10").labels).tolist() == [1000] * 10


def test_subset_by_count_is_seeded_and_in_file_order():
    data_dir = shared_data_dir("omniglot")
    first = load_source("omniglot-latin", data_dir, count=52, seed=3)
    again = load_source("omniglot-latin", data_dir, count=52, seed=3)
    other = load_source("omniglot-latin", data_dir, count=52, seed=4)
    np.testing.assert_array_equal(first.images, again.images)
    assert len(first) == 52 and not np.array_equal(first.images, other.images)
    assert np.all(np.diff(first.labels) >= 0)
    with pytest.raises(ValueError, match=re.escape("count=521 is more than the 520 images")):
        load_source("omniglot-latin", data_dir, count=521)


def test_check_sources_on_the_shared_folder():
    checks = {check.name: check for check in check_sources(shared_data_dir("mnist", "omniglot"))}
    assert list(checks) == list(SOURCE_NAMES)
    assert checks["mnist"].ok and checks["mnist"].count == 70_000
    assert [f.path for f in checks["omniglot-latin"].files] == [
        "omniglot/images_background_small1.zip"
    ]
    assert not checks["emnist-digits"].found or checks["emnist-digits"].ok
    assert json.loads(json.dumps(checks["notmnist"].to_dict()))["files"][0] == {
        "path": "notmnist/t10k-images-idx3-ubyte.gz",
        "sha256": SHARED_COPY_SHA256["notmnist/t10k-images-idx3-ubyte.gz"],
    }


def test_cifar_subset_matches_the_full_load(loaded):
    subset = load_source("cifar10", shared_data_dir("cifar10"), count=300, seed=5)
    full = loaded("cifar10")
    chosen = choose_indices(len(full), 300, 5, "cifar10")  # what load_source draws
    np.testing.assert_array_equal(subset.images, full.images[chosen])
    np.testing.assert_array_equal(subset.labels, full.labels[chosen])


# --- checksums ----------------------------------------------------------------------


def test_known_table_holds_the_shared_and_the_official_mnist_hashes():
    assert set(SHARED_COPY_SHA256) <= set(KNOWN_SHA256)
    for name, digest in OFFICIAL_MNIST_SHA256.items():
        assert digest in KNOWN_SHA256[f"mnist/{name}"]


def test_checksum_mismatch_on_a_modified_copy(tmp_path):
    source = shared_data_dir("notmnist") / "notmnist"
    copy = tmp_path / "notmnist"
    shutil.copytree(source, copy)
    labels_path = copy / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels_path.read_bytes())
    labels_path.write_bytes(gzip.compress(raw, mtime=1))  # same labels, other bytes
    actual = __import__("hashlib").sha256(labels_path.read_bytes()).hexdigest()
    expected = SHARED_COPY_SHA256["notmnist/t10k-labels-idx1-ubyte.gz"]
    message = f"{labels_path}: SHA-256 mismatch: expected {expected}, got {actual}"
    with pytest.raises(DataError, match=re.escape(message)):
        load_source("notmnist", tmp_path)
    # A different but valid copy loads when the user says so.
    assert len(load_source("notmnist", tmp_path, verify=False)) == 10_000
    check = next(c for c in check_sources(tmp_path) if c.name == "notmnist")
    assert check.found and not check.ok and "SHA-256 mismatch" in check.error


def test_files_with_unknown_names_are_not_verified(tmp_path):
    folder = tmp_path / "emnist" / "gzip"
    folder.mkdir(parents=True)
    for part in ("train", "test"):
        write_idx(folder / f"emnist-digits-{part}-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
        write_idx(folder / f"emnist-digits-{part}-labels-idx1-ubyte.gz", np.zeros(2))
    assert len(load_source("emnist-digits", tmp_path)) == 4


# --- registry -----------------------------------------------------------------------


def test_unknown_source_names_the_valid_ones():
    with pytest.raises(ValueError, match=re.escape("unknown data source 'svhn'; valid: mnist,")):
        load_source("svhn")


def test_check_sources_on_an_empty_folder(tmp_path):
    checks = {check.name: check for check in check_sources(tmp_path)}
    for name in ("mnist", "emnist-letters", "notmnist", "omniglot-latin", "cifar10"):
        assert not checks[name].found and "not found" in checks[name].error
        assert str(tmp_path) in checks[name].error
    assert checks["uniform-noise"].ok and checks["uniform-noise"].count == 1000
    with pytest.raises(MissingDataError, match=re.escape(str(tmp_path / "omniglot"))):
        load_source("omniglot-latin", tmp_path)


# --- noise ----------------------------------------------------------------------------


def test_noise_is_seeded_and_has_the_documented_distribution():
    uniform = uniform_noise(200, seed=7)
    np.testing.assert_array_equal(uniform.images, uniform_noise(200, seed=7).images)
    assert not np.array_equal(uniform.images, uniform_noise(200, seed=8).images)
    assert uniform.labels is None and uniform.images.shape == (200, 28, 28)
    assert uniform.images.min() == 0 and uniform.images.max() == 255
    assert abs(uniform.images.mean() - 127.5) < 2
    normal = load_source("normal-noise", count=300, seed=1)
    assert normal.name == "normal-noise" and len(normal) == 300
    assert abs(normal.images.mean() - 127.5) < 2
    assert abs(normal.images.std() - NORMAL_NOISE_STD) < 2
    assert normal.provenance[0].path.startswith("generated:normal-noise(seed=1, count=300")


def test_noise_png_scores_as_the_pipeline_saw_it():
    from scoring.preprocessing import decode_image, prepare_image

    for image in normal_noise(50, seed=2).images:
        posted = prepare_image(decode_image(encode(Image.fromarray(image))))
        np.testing.assert_array_equal(posted, image)


@pytest.mark.parametrize("count", [0, -3, 2.5])
def test_noise_count_must_be_positive(count):
    with pytest.raises(
        ValueError, match=re.escape(f"count must be a positive integer, got {count!r}")
    ):
        uniform_noise(count)


# --- CIFAR-10 records written by the test ----------------------------------------------


def cifar_record(label: int, red: int, green: int, blue: int) -> bytes:
    """A 16x16 square of one colour in the middle of a black 32x32 image."""
    square = np.zeros((32, 32), np.uint8)
    square[8:24, 8:24] = 1
    return bytes([label]) + b"".join((square * value).tobytes() for value in (red, green, blue))


def test_cifar_planes_are_red_green_blue(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    records = [cifar_record(3, 255, 0, 0), cifar_record(7, 0, 255, 0), cifar_record(9, 0, 0, 255)]
    (folder / "test_batch.bin").write_bytes(b"".join(records))
    (folder / "data_batch_1.bin").write_bytes(cifar_record(1, 10, 20, 30))
    rgb, labels = read_cifar_batch(folder / "test_batch.bin")
    assert rgb.shape == (3, 32, 32, 3) and labels.tolist() == [3, 7, 9]
    assert rgb[0, 10, 10].tolist() == [255, 0, 0] and rgb[0, 0, 0].tolist() == [0, 0, 0]
    dataset = load_cifar10(tmp_path, verify=False)
    assert dataset.labels.tolist() == [3, 7, 9, 1]  # test batch first
    # The square becomes a 20x20 square of its colour's ITU-R 601 luma.
    for image, luma in zip(dataset.images[:3], [76, 150, 29], strict=True):
        assert image.max() == luma and (image == luma).sum() == 20 * 20
    assert not dataset.images[3].any()  # luma 19 is below the ink threshold


def test_cifar_truncated_file(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    path = folder / "test_batch.bin"
    path.write_bytes(cifar_record(0, 1, 2, 3) * 2 + b"\x00" * 100)
    message = f"{path}: truncated or not a CIFAR-10 binary batch: {2 * RECORD_BYTES + 100} bytes"
    with pytest.raises(DataError, match=re.escape(message)):
        load_cifar10(tmp_path, verify=False)  # verified, the checksum would fail first


def test_cifar_missing(tmp_path):
    with pytest.raises(MissingDataError, match="test_batch.bin: file not found"):
        load_cifar10(tmp_path)


# --- Omniglot archives written by the test ---------------------------------------------


def write_omniglot(path, alphabets: dict[str, int], drawers: int = 2) -> None:
    stroke = Image.fromarray(plus_sign(105)).convert("1")  # black strokes on white, 1-bit
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet, characters in alphabets.items():
            for character in range(1, characters + 1):
                for drawer in range(1, drawers + 1):
                    name = f"{path.stem}/{alphabet}/character{character:02d}/0001_{drawer:02d}.png"
                    archive.writestr(name, encode(stroke))


def test_omniglot_alphabets_labels_and_archive_choice(tmp_path):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    write_omniglot(folder / "images_background_small1.zip", {"Latin": 2, "Greek": 1})
    write_omniglot(folder / "images_background.zip", {"Latin": 3, "Greek": 2, "Korean": 1})
    write_omniglot(folder / "images_evaluation.zip", {"Tengwar": 2})
    latin = load_source("omniglot-latin", tmp_path)
    assert latin.labels.tolist() == [0, 0, 1, 1, 2, 2]  # from images_background.zip only
    assert [p.path for p in latin.provenance] == [
        "omniglot/images_background.zip",
        "omniglot/images_evaluation.zip",
    ]
    assert border_mean(latin.images) == 0 and latin.images.max() == 255
    other = load_source("omniglot-other", tmp_path)
    assert len(other) == 2 * (2 + 1 + 2) and other.labels.max() == 4
    with pytest.raises(DataError, match=re.escape("available: ['Greek', 'Korean', 'Latin'")):
        load_omniglot(tmp_path, ["Klingon"])


def test_omniglot_bad_zip(tmp_path):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    path = folder / "images_background_small1.zip"
    path.write_bytes(b"PK\x03\x04 but not really a zip")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable zip archive")):
        load_omniglot(tmp_path, verify=False)


def test_omniglot_corrupt_member(tmp_path):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    path = folder / "images_evaluation.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images_evaluation/Latin/character01/0001_01.png", b"\x89PNG broken")
    message = f"{path}: member images_evaluation/Latin/character01/0001_01.png: "
    with pytest.raises(DataError, match=re.escape(message)):
        load_omniglot(tmp_path)


# --- downloads: wired to the loaders' names, exercised on local file:// URLs ----------


def test_download_tables_match_the_loaders():
    assert set(mnist_downloads()) == {name for pair in MNIST_FILES.values() for name in pair}
    assert all(mirror.startswith("https://") for mirror in MNIST_MIRRORS)
    assert EMNIST_URL.startswith("https://") and EMNIST_URL.endswith("/gzip.zip")
    assert "gzip/emnist-letters-test-labels-idx1-ubyte.gz" in emnist_members()
    assert len(emnist_members()) == 8


def test_fetch_verifies_the_digest(tmp_path):
    source = tmp_path / "served.bin"
    source.write_bytes(b"some published bytes")
    url = source.as_uri()
    digest = __import__("hashlib").sha256(source.read_bytes()).hexdigest()
    assert fetch(url, tmp_path / "ok.bin", sha256=digest, progress=False).read_bytes() == (
        b"some published bytes"
    )
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.bin'}: SHA256 mismatch")):
        fetch(url, tmp_path / "bad.bin", sha256="0" * 64, progress=False)
    assert not list(tmp_path.glob("bad.bin*"))  # nothing half-written is left behind
    with pytest.raises(urllib.request.URLError):
        fetch((tmp_path / "absent").as_uri(), tmp_path / "x", progress=False)


def test_extracted_emnist_archive_loads_transposed(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    images[:, 3, :] = 255  # a horizontal line; EMNIST stores it as a vertical one
    staging = tmp_path / "staging"
    staging.mkdir()
    archive = tmp_path / "gzip.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for member in emnist_members():
            file = staging / member.split("/")[1]
            is_images = "images" in member
            write_idx(file, images.transpose(0, 2, 1) if is_images else np.array([1, 2]))
            handle.write(file, member)
    data_dir = tmp_path / "data"
    paths = extract_emnist(archive, data_dir / "emnist")
    assert len(paths) == 8 and all(p.parent == data_dir / "emnist" / "gzip" for p in paths)
    np.testing.assert_array_equal(load_emnist(data_dir, "letters", "test").images, images)
