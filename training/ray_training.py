"""Ensemble members trained as Ray tasks, in parallel, on a cluster's CPUs or GPUs.

``python -m training build --ray-address auto`` (or ``train``) hands every member that
has no checkpoint yet to a Ray task; the build's engine passes (feature-space
statistics, paper-level features, ensemble views) run as Ray tasks too
(:class:`training.extraction.RayExtractor`); fitting and the report stay in the driver. A task
runs the same :func:`training.train.train_member` as a local build, with the driver's
torch thread count, and sends the trained model back; the driver saves it with
:func:`training.train.save_member`, so it needs no file system shared with the workers.
With the same seeds and thread counts a build on Ray writes the same bundle as a local
one.

``ray_address``: ``"local"`` starts a Ray instance on this machine for the build (no
dashboard), ``"auto"`` joins the cluster this machine is part of, ``host:port`` a given
head node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainingConfig
from training.data.base import Dataset

__all__ = ["RayResources", "ray_session", "train_members_on_ray"]


@dataclass(frozen=True)
class RayResources:
    """What a build's Ray tasks ask for: a member's (``--ray-cpus-per-member``/
    ``--ray-gpus-per-member``) and an engine pass's."""

    cpus: float = 1.0
    gpus: float = 0.0
    #: CPUs an engine-pass task asks for (``--ray-cpus-per-extraction-task``).
    extraction_cpus: float = 1.0


@contextmanager
def ray_session(ray_address: str) -> Iterator[None]:
    """Ray for the length of a build: joined (or, for "local", started without a
    dashboard) unless the caller already initialized it; shut down only if started here."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        options = {"include_dashboard": False} if ray_address == "local" else {}
        ray.init(address=ray_address, log_to_driver=False, **options)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def _train_member(config: dict, member: int, known: Dataset, device: str, threads: int):
    """In the task: train one member with the driver's thread count; the model and its
    result go back to the driver (Ray pickles them), which saves them."""
    import torch

    from training.train import train_member

    torch.set_num_threads(threads)
    training = TrainingConfig.from_dict(config)
    model, result = train_member(training, member, known, progress=False, device=device)
    return model.cpu(), result


def train_members_on_ray(
    config: TrainingConfig,
    known: Dataset,
    members: Sequence[int],
    output_dir: Path,
    *,
    ray_address: str,
    resources: RayResources = RayResources(),
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> None:
    """Train ``members`` as parallel Ray tasks; save each one into ``output_dir`` as it
    finishes, as a local build does."""
    import ray
    import torch

    from training.train import save_member

    with ray_session(ray_address):
        task = ray.remote(num_cpus=resources.cpus, num_gpus=resources.gpus)(_train_member)
        known_ref = ray.put(known)
        threads = torch.get_num_threads()
        pending = {
            task.remote(config.to_dict(), member, known_ref, device, threads): member
            for member in members
        }
        log(f"training members {list(members)} as Ray tasks ({resources})")
        output_dir.mkdir(parents=True, exist_ok=True)
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            member = pending.pop(done)
            model, result = ray.get(done)
            save_member(output_dir, model, result, config)
            log(f"member {member}: trained on Ray")
