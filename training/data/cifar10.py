"""CIFAR-10 from the binary record layout in ``<data_dir>/cifar10/cifar-10-batches-bin/``.

Each record is 1 label byte then 3,072 pixel bytes: the 32x32 R plane, G plane and B
plane, row-major. ``test_batch.bin`` is required; ``data_batch_1..5.bin`` are added
after it when present. Every image goes through ``prepare_array`` (ITU-R 601 luma,
inversion rule, MNIST framing), as the service would for a posted CIFAR-10 PNG.
Labels 0-9 are the CIFAR-10 classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scoring.preprocessing import prepare_array
from training.data.base import DataError, Dataset, choose_indices, require_file
from training.data.checksums import checked_provenance

CIFAR_FOLDER = ("cifar10", "cifar-10-batches-bin")
TEST_BATCH = "test_batch.bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
IMAGE_SIDE = 32
RECORD_BYTES = 1 + 3 * IMAGE_SIDE * IMAGE_SIDE  # 3,073
NUM_CLASSES = 10


def cifar10_files(data_dir: Path) -> list[Path]:
    folder = Path(data_dir).joinpath(*CIFAR_FOLDER)
    files = [require_file(folder / TEST_BATCH)]
    return files + [folder / name for name in TRAIN_BATCHES if (folder / name).is_file()]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw records: RGB images ``(N, 32, 32, 3)`` uint8 and labels ``(N,)`` int64."""
    raw = require_file(path).read_bytes()
    if len(raw) == 0 or len(raw) % RECORD_BYTES != 0:
        raise DataError(
            f"{path}: truncated or not a CIFAR-10 binary batch: {len(raw)} bytes is not a "
            f"positive multiple of the {RECORD_BYTES}-byte record"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{path}: label {labels.max()} out of range 0-{NUM_CLASSES - 1}; "
            "not a CIFAR-10 binary batch (CIFAR-100 records have two label bytes)"
        )
    planes = records[:, 1:].reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)  # (N, C, H, W)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels  # (N, H, W, C)


def load_cifar10(
    data_dir: Path, *, count: int | None = None, seed: int = 0, verify: bool = True
) -> Dataset:
    """All records (test batch first), or ``count`` drawn at random (``seed``) before the
    preprocessing, which is most of the cost."""
    data_dir = Path(data_dir)
    provenance, batches = [], []
    for path in cifar10_files(data_dir):
        provenance.append(checked_provenance(path, data_dir, verify=verify))
        batches.append(read_cifar_batch(path))
    rgb = np.concatenate([images for images, _ in batches])  # (N, 32, 32, 3)
    labels = np.concatenate([labels for _, labels in batches])
    if count is not None:
        chosen = choose_indices(len(rgb), count, seed, "cifar10")
        rgb, labels = rgb[chosen], labels[chosen]
    images = np.stack([prepare_array(image) for image in rgb])  # (N, 28, 28)
    return Dataset("cifar10", images, labels, provenance)
