"""Training of the ensemble: one resampled split, initialisation and run per member.

This is the paper's non-parametric bootstrap (DESIGN.md section 4): member k draws its
own permutation of the pooled known concept, its own train / validation / test split,
its own initial weights and its own batch order, all from ``config.member_seed(k)``.

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

from training.config import OptimConfig, TrainingConfig
from training.data.base import Dataset
from training.model import PaperCNN, images_to_tensor

#: Batch size for evaluation passes; only memory, not results, depends on it.
EVAL_BATCH_SIZE = 2048


@dataclass(frozen=True)
class MemberSplit:
    """Indices into the pooled known concept for one member."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def digest(self) -> str:
        """SHA-256 over the three index arrays: proves a reloaded split is the trained one."""
        digest = hashlib.sha256()
        for part in (self.train, self.validation, self.test):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return digest.hexdigest()


def member_split(config: TrainingConfig, member: int, num_images: int) -> MemberSplit:
    """The member's own seeded permutation of all images, cut into test, validation, train."""
    split = config.split
    if split.test_size + split.validation_size >= num_images:
        raise ValueError(
            f"test_size + validation_size = {split.test_size + split.validation_size} "
            f"leaves no training images out of {num_images}"
        )
    permutation = np.random.default_rng(config.member_seed(member)).permutation(num_images)
    test = permutation[: split.test_size]
    validation = permutation[split.test_size : split.test_size + split.validation_size]
    train = permutation[split.test_size + split.validation_size :]
    if split.train_size:
        train = train[: split.train_size]
    return MemberSplit(train=train, validation=validation, test=test)


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


def train_member(
    config: TrainingConfig,
    member: int,
    known: Dataset,
    progress: bool = True,
    max_epochs: int | None = None,
) -> tuple[PaperCNN, MemberResult]:
    """Train one member on its own split; returns the best-on-validation weights."""
    seed = config.member_seed(member)
    optim_config: OptimConfig = config.optim
    split = member_split(config, member, len(known))
    images = images_to_tensor(known.images)  # (N, 1, 28, 28) float32 in [0, 1]
    labels = torch.as_tensor(known.labels, dtype=torch.int64)
    train_x, train_y = images[split.train], labels[split.train]
    val_x, val_y = images[split.validation], labels[split.validation]
    test_x, test_y = images[split.test], labels[split.test]

    torch.manual_seed(seed)  # initial weights
    model = PaperCNN(config.model)
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
        order = torch.randperm(len(train_x), generator=batch_order)
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
    result = MemberResult(
        member=member,
        seed=seed,
        test_accuracy=accuracy(model, test_x, test_y),
        validation_accuracy=best_accuracy,
        epochs=epochs_run,
        seconds=round(time.perf_counter() - started, 1),
        split_sizes={
            "train": len(split.train),
            "validation": len(split.validation),
            "test": len(split.test),
        },
        split_digest=split.digest(),
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
    model = PaperCNN(config.model)
    model.load_state_dict(load_file(str(weights_path)))
    model.eval()
    return model, record


def train_ensemble(
    config: TrainingConfig,
    known: Dataset,
    output_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train every member that has no checkpoint yet; returns all members' records."""
    records = []
    for member in range(config.ensemble_size):
        weights_path, record_path = member_paths(output_dir, member)
        if record_path.exists() and weights_path.exists():
            record = json.loads(record_path.read_text())
            if record["config"] != config.to_dict():
                raise ValueError(
                    f"{record_path} was trained with another configuration; "
                    "use a new output directory or delete it"
                )
            log(f"member {member}: already trained (test accuracy {record['test_accuracy']:.4f})")
            records.append(record)
            continue
        model, result = train_member(config, member, known, progress=progress)
        save_member(output_dir, model, result, config)
        log(
            f"member {member}: test accuracy {result.test_accuracy:.4f}, "
            f"{result.epochs} epochs, {result.seconds:.0f} s"
        )
        records.append(json.loads(record_path.read_text()))
    return records
