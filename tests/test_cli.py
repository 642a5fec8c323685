"""``python -m training``: exit codes, ``--dataset``, ``--no-verify`` and the training flags.

Each test runs the real command (a subprocess where the exit code and stderr matter, the
same ``main`` in-process where the output is enough) on folders and files it writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_imagefolder import shape_image, write_folder

from training.cli import BUILD_SOURCES, main
from training.data.idx import write_idx
from training.data.mnist import MNIST_FILES

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )


def test_build_sources_are_what_a_default_build_reads():
    from training.bundle_builder import UNKNOWN_CONCEPTS

    assert {"mnist", *UNKNOWN_CONCEPTS.values()} <= set(BUILD_SOURCES)


def test_data_check_exits_non_zero_when_sources_are_missing(tmp_path):
    result = run_cli("data-check", "--data-dir", str(tmp_path / "nonexistent"))
    assert result.returncode == 1
    assert "error: sources missing: mnist, mnist-train, mnist-test, notmnist" in result.stderr
    assert "emnist-digits    missing (optional)" in result.stdout  # not a build source
    assert "Traceback" not in result.stderr


def write_own_mnist(data_dir: Path) -> None:
    """Valid MNIST-layout IDX files that are not the official ones (a user's own copy)."""
    rng = np.random.default_rng(0)
    folder = data_dir / "mnist"
    folder.mkdir(parents=True)
    for count, (image_file, label_file) in zip((60, 10), MNIST_FILES.values(), strict=True):
        write_idx(folder / image_file, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / label_file, rng.integers(0, 10, count, dtype=np.uint8))


def test_other_mnist_files_fail_the_checksum_and_load_with_no_verify(tmp_path, capsys):
    write_own_mnist(tmp_path)
    result = run_cli("data-check", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "mnist-train      broken:" in result.stdout
    assert (
        "SHA-256 mismatch" in result.stdout and "skip the check with --no-verify" in result.stdout
    )
    assert "broken: mnist, mnist-train, mnist-test" in result.stderr
    assert "(a different but valid copy of a file: add --no-verify)" in result.stderr

    assert main(["data-check", "--data-dir", str(tmp_path), "--no-verify", "--json"]) == 1
    checks = {check["name"]: check for check in json.loads(capsys.readouterr().out)}
    assert checks["mnist"]["ok"] and checks["mnist"]["count"] == 70
    assert not checks["notmnist"]["found"]  # still missing: the exit code stays 1


def test_data_check_reads_a_dataset_and_makes_the_other_sources_optional(tmp_path, capsys):
    root = write_folder(tmp_path / "shapes", {"bar": 12, "ring": 6})
    status = main(["data-check", "--dataset", str(root), "--data-dir", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert status == 0
    assert f"data set {root}: 2 classes, 15 training and 3 test images" in out
    assert "  bar                   10 train       2 test" in out
    assert "  mnist            missing (optional)" in out


def test_data_check_names_an_unreadable_image_of_the_dataset(tmp_path):
    root = write_folder(tmp_path / "shapes", {"bar": 4, "ring": 4})
    (root / "ring" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = run_cli("data-check", "--dataset", str(root))
    assert result.returncode == 2
    assert f"error: {root / 'ring' / 'bad.jpg'}: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_and_build_offer_the_dataset_and_training_flags():
    for command in ("train", "build"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        for option in ("--members", "--ensemble-size", "--epochs", "--device", "--dataset"):
            assert option in result.stdout, (command, option)
        assert "--test-fraction" in result.stdout and "--no-verify" in result.stdout
    assert "--known-unknowns" in run_cli("build", "--help").stdout


def test_build_explains_a_dataset_too_small_for_the_splits(tmp_path):
    root = write_folder(tmp_path / "shapes", {"bar": 20, "ring": 20})
    result = run_cli(
        "build", "--dataset", str(root), "--output-dir", str(tmp_path / "bundle"), "--no-progress"
    )
    assert result.returncode == 2, result.stderr
    assert f"error: {root}: 34 official training images are too few" in result.stderr
    assert "--set split.calibration_size=5 --set split.validation_size=5" in result.stderr
    assert not (tmp_path / "bundle").exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="a CUDA device is there to train on"
)
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    result = run_cli("train", "--device", "cuda", "--output-dir", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "error: device 'cuda': torch" in result.stderr and "--device cpu" in result.stderr


def test_train_on_a_dataset_with_members_and_epochs(tmp_path, capsys):
    root = write_folder(tmp_path / "shapes", {"bar": 40, "column": 40, "ring": 40})
    shape_image(2, 99).save(root / "ring" / "extra.webp")
    output = tmp_path / "members"
    status = main(
        [
            "train",
            "--dataset",
            str(root),
            "--members",
            "2",
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--output-dir",
            str(output),
            "--no-progress",
            "--set",
            "optim.batch_size=16",
            "--set",
            "split.calibration_size=16",
            "--set",
            "split.validation_size=16",
        ]
    )
    assert status == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("2 members, test accuracy ")
    records = [json.loads((output / f"member_{k}.json").read_text()) for k in range(2)]
    for record in records:
        assert record["num_classes"] == 3 and record["epochs"] <= 2
        # 100 official training images: 7 of each class's 40 or 41 are test images
        assert record["split_sizes"] == {
            "train": 68,
            "validation": 16,
            "test": 21,
            "calibration": 16,
        }
