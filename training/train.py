"""Training of the ensemble: one resampled split, initialisation and run per member.

This is the paper's non-parametric bootstrap (DESIGN.md section 4): member k draws its
own permutation of the member pool (the official training set less the calibration
part), its own train / validation split, its own initial weights and its own batch
order, all from ``config.member_seed(k)``. No member sees the official test set or the
calibration part.

Members are written as they finish (``member_<k>.safetensors`` + ``member_<k>.json``),
so an interrupted run resumes with the first member that has no checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm import tqdm

from scoring.features import NUM_CLASSES
from training.config import OptimConfig, TrainingConfig
from training.data.base import Dataset
from training.model import PaperCNN, images_to_tensor

#: Batch size for evaluation passes; only memory, not results, depends on it.
EVAL_BATCH_SIZE = 2048


@dataclass(frozen=True)
class KnownSplits:
    """The parts of the known concept shared by every member (DESIGN.md section 4).

    Indices point into the pooled known concept, whose first ``num_train`` images are
    the official training set and whose last ``num_test`` images are the official test set.
    """

    test: np.ndarray
    calibration: np.ndarray
    pool: np.ndarray


def known_splits(config: TrainingConfig, num_train: int, num_test: int) -> KnownSplits:
    """Official test set, a seeded calibration part of the training set, and the pool.

    The calibration part depends on ``config.seed`` only, never on a member, so that it is
    held out from every member of the ensemble.
    """
    split = config.split
    if num_test < 1:
        raise ValueError("the known concept has no official test images")
    if split.calibration_size + split.validation_size >= num_train:
        raise ValueError(
            f"calibration_size + validation_size = "
            f"{split.calibration_size + split.validation_size} leaves no training images "
            f"out of {num_train}"
        )
    test = np.arange(num_train, num_train + num_test)
    if split.test_size and split.test_size < num_test:
        choice = np.random.default_rng(config.seed + 7).permutation(num_test)[: split.test_size]
        test = test[np.sort(choice)]
    permutation = np.random.default_rng(config.seed).permutation(num_train)
    calibration = np.sort(permutation[: split.calibration_size])
    pool = np.sort(permutation[split.calibration_size :])
    return KnownSplits(test=test, calibration=calibration, pool=pool)


@dataclass(frozen=True)
class MemberSplit:
    """Indices into the pooled known concept for one member."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    calibration: np.ndarray

    def digest(self) -> str:
        """SHA-256 over the index arrays: proves a reloaded split is the trained one."""
        digest = hashlib.sha256()
        for part in (self.train, self.validation, self.test, self.calibration):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return digest.hexdigest()


def member_split(config: TrainingConfig, member: int, num_train: int, num_test: int) -> MemberSplit:
    """The member's own seeded permutation of the pool, cut into validation and train.

    Test and calibration are the ensemble's (:func:`known_splits`), the same for every member.
    """
    shared = known_splits(config, num_train, num_test)
    permutation = np.random.default_rng(config.member_seed(member)).permutation(shared.pool)
    validation = permutation[: config.split.validation_size]
    train = permutation[config.split.validation_size :]
    if config.split.train_size:
        train = train[: config.split.train_size]
    return MemberSplit(
        train=train, validation=validation, test=shared.test, calibration=shared.calibration
    )


def split_of(config: TrainingConfig, member: int, known: Dataset) -> MemberSplit:
    """:func:`member_split` of a pooled known concept (official train first, then test)."""
    if known.num_train is None:
        raise ValueError(
            f"the known concept {known.name!r} has no official train/test boundary (num_train)"
        )
    return member_split(config, member, known.num_train, len(known) - known.num_train)


@torch.no_grad()
def accuracy(model: PaperCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy with dropout off."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        logits = model(images[start : start + EVAL_BATCH_SIZE])
        correct += (logits.argmax(1) == labels[start : start + EVAL_BATCH_SIZE]).sum().item()
    model.train(was_training)
    return correct / max(len(images), 1)


@dataclass
class MemberResult:
    member: int
    seed: int
    test_accuracy: float
    validation_accuracy: float
    epochs: int
    seconds: float
    split_sizes: dict[str, int]
    split_digest: str
    # Outputs of the dense layer: the data set's classes (10 for digits).
    num_classes: int = NUM_CLASSES
    # SHA-256 of the known concept's images and labels: a resumed run refuses members
    # trained on other data (a user's folder changed between runs).
    data_digest: str = ""


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device named ``device`` ("cpu", "cuda", "cuda:1"), checked to exist."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device name ({error})") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: torch {torch.__version__} sees no CUDA device "
            "(torch.cuda.is_available() is False); use --device cpu, or install a CUDA "
            "build of torch on a machine with a GPU"
        )
    index = resolved.index
    if resolved.type == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def num_classes_of(known: Dataset) -> int:
    """Classes of a known concept: its class names where it has them, else the digits."""
    return len(known.class_names) if known.class_names else NUM_CLASSES


def data_digest(known: Dataset) -> str:
    """SHA-256 over the known concept's images and labels (and its train/test boundary)."""
    digest = hashlib.sha256(np.ascontiguousarray(known.images).tobytes())
    digest.update(np.ascontiguousarray(known.labels, dtype=np.int64).tobytes())
    digest.update(str(known.num_train).encode())
    return digest.hexdigest()


def train_member(
    config: TrainingConfig,
    member: int,
    known: Dataset,
    progress: bool = True,
    max_epochs: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PaperCNN, MemberResult]:
    """Train one member on its own split; returns the best-on-validation weights.

    ``device`` is where the training runs ("cpu", "cuda"); the initial weights are drawn
    on the CPU and the returned model is on the CPU, so only the arithmetic moves.
    """
    device = resolve_device(device)
    seed = config.member_seed(member)
    optim_config: OptimConfig = config.optim
    split = split_of(config, member, known)
    num_classes = num_classes_of(known)
    if known.labels is None or known.labels.min() < 0 or known.labels.max() >= num_classes:
        raise ValueError(
            f"the known concept {known.name!r} needs labels from 0 to {num_classes - 1}"
        )
    images = images_to_tensor(known.images).to(device)  # (N, 1, 28, 28) float32 in [0, 1]
    labels = torch.as_tensor(known.labels, dtype=torch.int64).to(device)
    train_x, train_y = images[split.train], labels[split.train]
    val_x, val_y = images[split.validation], labels[split.validation]
    test_x, test_y = images[split.test], labels[split.test]

    torch.manual_seed(seed)  # initial weights
    model = PaperCNN(config.model, num_classes).to(device)
    batch_order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=optim_config.learning_rate, momentum=optim_config.momentum
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=optim_config.lr_reduce_factor,
        patience=optim_config.lr_patience,
        min_lr=optim_config.lr_floor,
    )

    best_accuracy, best_state, epochs_without_gain = -1.0, None, 0
    epochs = max_epochs or optim_config.max_epochs
    started = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"member {member}", disable=not progress, unit="epoch")
    epochs_run = 0
    for _ in bar:
        epochs_run += 1
        # forward / backward over one shuffled pass of the training split
        model.train()
        order = torch.randperm(len(train_x), generator=batch_order).to(device)
        loss_sum, batches = 0.0, 0
        for start in range(0, len(order), optim_config.batch_size):
            batch = order[start : start + optim_config.batch_size]
            logits = model(train_x[batch])
            loss = F.cross_entropy(logits, train_y[batch]) + optim_config.l2 * model.l2_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, batches = loss_sum + loss.item(), batches + 1

        # evaluate, schedule the learning rate, keep the best weights, stop early
        validation_accuracy = accuracy(model, val_x, val_y)
        scheduler.step(validation_accuracy)
        if validation_accuracy > best_accuracy:
            best_accuracy, epochs_without_gain = validation_accuracy, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            epochs_without_gain += 1
        bar.set_postfix(
            loss=f"{loss_sum / max(batches, 1):.4f}",
            val_acc=f"{validation_accuracy:.4f}",
            lr=f"{optimizer.param_groups[0]['lr']:.2g}",
        )
        if epochs_without_gain >= optim_config.early_stopping_patience:
            break

    model.load_state_dict(best_state)
    model.eval()
    test_accuracy = accuracy(model, test_x, test_y)
    model.cpu()  # saved and exported from the CPU whatever device trained it
    result = MemberResult(
        member=member,
        seed=seed,
        test_accuracy=test_accuracy,
        validation_accuracy=best_accuracy,
        epochs=epochs_run,
        seconds=round(time.perf_counter() - started, 1),
        split_sizes={
            "train": len(split.train),
            "validation": len(split.validation),
            "test": len(split.test),
            "calibration": len(split.calibration),
        },
        split_digest=split.digest(),
        num_classes=num_classes,
        data_digest=data_digest(known),
    )
    return model, result


def member_paths(output_dir: Path, member: int) -> tuple[Path, Path]:
    return output_dir / f"member_{member}.safetensors", output_dir / f"member_{member}.json"


def save_member(output_dir: Path, model: PaperCNN, result: MemberResult, config: TrainingConfig):
    """Weights first, then the JSON record: a member counts as done once its JSON exists."""
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path, record_path = member_paths(output_dir, result.member)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_path))
    record = {"config": config.to_dict(), **result.__dict__}
    temporary = record_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(record_path)


def load_member(output_dir: Path, member: int) -> tuple[PaperCNN, dict]:
    """A saved member with its record; safetensors holds tensors only, never code."""
    weights_path, record_path = member_paths(output_dir, member)
    record = json.loads(record_path.read_text())
    config = TrainingConfig.from_dict(record["config"])
    state = load_file(str(weights_path))
    model = PaperCNN(config.model, int(state["dense.bias"].shape[0]))  # the weights' classes
    model.load_state_dict(state)
    model.eval()
    return model, record


def train_ensemble(
    config: TrainingConfig,
    known: Dataset,
    output_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    ray_address: str | None = None,
    ray_resources=None,
) -> list[dict]:
    """Train every member that has no checkpoint yet (on ``device``); returns all members'
    records.

    ``ray_address`` (``"local"``, ``"auto"`` or ``host:port``): the missing members are
    trained in parallel as Ray tasks (:mod:`training.ray_training`, with
    ``ray_resources`` per task), then read back like checkpoints of an earlier run.
    """
    missing = [
        member
        for member in range(config.ensemble_size)
        if not all(path.exists() for path in member_paths(output_dir, member))
    ]
    if ray_address is not None and missing:
        from training.ray_training import RayResources, train_members_on_ray

        train_members_on_ray(
            config,
            known,
            missing,
            Path(output_dir),
            ray_address=ray_address,
            resources=ray_resources or RayResources(),
            device=str(device),
            log=log,
        )
    records = []
    digest = None
    for member in range(config.ensemble_size):
        weights_path, record_path = member_paths(output_dir, member)
        if record_path.exists() and weights_path.exists():
            record = json.loads(record_path.read_text())
            if record["config"] != config.to_dict():
                raise ValueError(
                    f"{record_path} was trained with another configuration; "
                    "use a new output directory or delete it"
                )
            digest = digest or data_digest(known)
            if record.get("data_digest", digest) != digest:  # older records have none
                raise ValueError(
                    f"{record_path} was trained on other data (the images or labels of "
                    f"{known.name!r} changed); use a new output directory or delete it"
                )
            log(f"member {member}: already trained (test accuracy {record['test_accuracy']:.4f})")
            records.append(record)
            continue
        model, result = train_member(config, member, known, progress=progress, device=device)
        save_member(output_dir, model, result, config)
        log(
            f"member {member}: test accuracy {result.test_accuracy:.4f}, "
            f"{result.epochs} epochs, {result.seconds:.0f} s"
        )
        records.append(json.loads(record_path.read_text()))
    return records
