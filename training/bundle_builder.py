"""Build a whole model bundle from a data directory: ``python -m training build``.

Stages, each resumable from ``work_dir``:

1. load the known concept (pooled MNIST) and the unknown concepts;
2. train the ensemble (members already in ``work_dir/members`` are kept);
3. export one scorer graph per member, checked against the torch reference;
4. compute features with the shared engine, evaluate, fit the meta heads, write the
   report (features are cached in ``work_dir/features``);
5. write the bundle: graphs, weights, heads, report and a manifest that records version,
   configuration, code revision, data provenance and the SHA-256 of every file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import joblib
import numpy as np

from scoring.bundle import HEADS_PATH, REPORT_DIR, write_manifest
from training.config import TrainingConfig
from training.data.base import Dataset
from training.data.mnist import load_mnist
from training.data.sources import load_source
from training.train import load_member, member_split, train_ensemble

#: The unknown concepts of the evaluation protocol (DESIGN.md section 4) and the source
#: each is loaded from.
UNKNOWN_CONCEPTS: dict[str, str] = {
    "notmnist": "notmnist",
    "omniglot_latin": "omniglot-latin",
    "cifar10": "cifar10",
    "omniglot_other": "omniglot-other",
    "uniform_noise": "uniform-noise",
    "normal_noise": "normal-noise",
}

#: Chosen default: noise images per noise concept in the evaluation (the set is generated,
#: so its size only buys precision); the 200 known-unknown noise images come on top.
NOISE_IMAGES = 2_000


def code_revision() -> str:
    """The git commit the bundle was built from, with '+dirty' for uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("+dirty" if dirty else "")


def load_concepts(
    data_dir: Path, seed: int, max_concept_images: int | None = None
) -> tuple[Dataset, dict[str, Dataset]]:
    """The pooled known concept and every unknown concept, noise generated from ``seed``.

    ``max_concept_images`` caps each unknown concept with a seeded subset (quick builds
    and tests); None evaluates on every image.
    """
    known = load_mnist(data_dir)
    unknown = {}
    for concept, source in UNKNOWN_CONCEPTS.items():
        count = NOISE_IMAGES if source.endswith("noise") else None
        dataset = load_source(source, data_dir, seed=seed, count=count)
        if max_concept_images is not None and len(dataset) > max_concept_images:
            keep = np.random.default_rng(seed).permutation(len(dataset))[:max_concept_images]
            dataset = dataset.subset(np.sort(keep))
        unknown[concept] = dataset
    return known, unknown


def provenance(known: Dataset, unknown: dict[str, Dataset]) -> dict[str, list[dict]]:
    return {
        dataset.name: [{"path": p.path, "sha256": p.sha256} for p in dataset.provenance]
        for dataset in [known, *unknown.values()]
    }


def _stage(message: str, log) -> float:
    log(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {message}")
    return time.perf_counter()


def evaluation_config(max_concept_images: int | None):
    """The protocol's defaults; a capped build also caps the known-unknown training parts
    at a third of each concept so that most of it stays for evaluation."""
    from training.evaluation.protocol import EvaluationConfig

    config = EvaluationConfig()
    if max_concept_images is None:
        return config
    counts = tuple(
        (concept, min(count, max_concept_images // 3))
        for concept, count in config.known_unknown_train_counts
    )
    return dataclasses.replace(config, known_unknown_train_counts=counts)


def known_unknown_sources(
    unknown: dict[str, Dataset], seed: int, train_counts: dict[str, int]
) -> dict[str, object]:
    """Evaluation images per concept, plus noise training parts from *other* seeds.

    The protocol splits CIFAR-10 and Omniglot into a training and an evaluation part
    itself; noise is free, so its 200 known-unknown training images are generated anew
    from a different seed rather than taken from the evaluated noise.
    """
    sources = {concept: dataset.images for concept, dataset in unknown.items()}
    for concept in ("uniform_noise", "normal_noise"):
        source = UNKNOWN_CONCEPTS[concept]
        sources[f"{concept}_train"] = load_source(
            source, None, seed=seed + 10_000, count=train_counts[concept]
        ).images
    return sources


def build_bundle(
    config: TrainingConfig,
    data_dir: Path,
    output_dir: Path,
    work_dir: Path | None = None,
    progress: bool = True,
    log=print,
    max_concept_images: int | None = None,
) -> dict:
    """Build the bundle in ``output_dir`` (replaced only at the end); returns the manifest."""
    from training.evaluation.protocol import MemberInput, run_evaluation
    from training.scorer_graph import export_scorer_graph

    output_dir = Path(output_dir)
    work_dir = Path(work_dir) if work_dir else output_dir.with_name(output_dir.name + ".work")
    members_dir, staging = work_dir / "members", work_dir / "bundle"
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(f"loading data from {data_dir}", log)
    known, unknown = load_concepts(data_dir, config.seed, max_concept_images)
    timings["data_s"] = time.perf_counter() - t

    t = _stage(f"training {config.ensemble_size} members in {members_dir}", log)
    records = train_ensemble(config, known, members_dir, progress=progress, log=log)
    timings["training_s"] = time.perf_counter() - t

    t = _stage("exporting and checking the scorer graphs", log)
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "graphs").mkdir(parents=True)
    (staging / "weights").mkdir()
    (staging / "meta").mkdir()
    member_inputs, export_checks = [], []
    for member, record in enumerate(records):
        model, _ = load_member(members_dir, member)
        split = member_split(config, member, len(known))
        if split.digest() != record["split_digest"]:
            raise ValueError(
                f"member {member}: its split no longer matches the one it was trained on"
            )
        graph_path = staging / "graphs" / f"member_{member}.onnx"
        check_images = known.images[split.test[:256]]
        check = export_scorer_graph(model, graph_path, check_images)
        export_checks.append({**check, "path": graph_path.relative_to(staging).as_posix()})
        for suffix in (".safetensors", ".json"):
            shutil.copy2(members_dir / f"member_{member}{suffix}", staging / "weights")
        member_inputs.append(
            MemberInput(
                model=model,
                graph_paths=[graph_path],
                validation_images=known.images[split.validation],
                validation_labels=known.labels[split.validation],
                test_images=known.images[split.test],
                test_labels=known.labels[split.test],
                seed=record["seed"],
            )
        )
    timings["export_s"] = time.perf_counter() - t

    t = _stage("features, meta classifiers, baselines and the report", log)
    protocol = evaluation_config(max_concept_images)
    result = run_evaluation(
        member_inputs,
        known_unknown_sources(unknown, config.seed, protocol.train_counts()),
        config=protocol,
        report_dir=staging / REPORT_DIR,
        cache_dir=work_dir / "features",
        progress=progress,
    )
    joblib.dump(
        {"p_correct": result.p_correct_heads, "p_ood": result.p_ood_heads},
        staging / HEADS_PATH,
    )
    timings["evaluation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    graphs = [f"graphs/member_{member}.onnx" for member in range(len(records))]
    content = hashlib.sha256()
    for relative in [*graphs, HEADS_PATH]:
        content.update((staging / relative).read_bytes())
    manifest = write_manifest(
        staging,
        {
            "name": output_dir.name,
            "model_version": f"{output_dir.name}-{content.hexdigest()[:12]}",
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "code_revision": code_revision(),
            "training_config": config.to_dict(),
            "data_provenance": provenance(known, unknown),
            "graphs": graphs,
            "heads": HEADS_PATH,
            "heads_orientation": {
                "p_correct": "predict_proba(features)[:, 1]",
                "p_ood": "1 - predict_proba(features)[:, 1]",
            },
            "ood_threshold": result.ood_threshold,
            "ood_threshold_rule": result.threshold,
            "head_selection": result.head_selection,
            "members": [
                {
                    "member": record["member"],
                    "seed": record["seed"],
                    "split_sizes": record["split_sizes"],
                    "split_digest": record["split_digest"],
                    "test_accuracy": record["test_accuracy"],
                    "validation_accuracy": record["validation_accuracy"],
                    "epochs": record["epochs"],
                    "training_seconds": record["seconds"],
                }
                for record in records
            ],
            "export_checks": export_checks,
            "build_seconds": {key: round(value, 1) for key, value in timings.items()},
        },
    )

    # Replace the old bundle only now that the new one is complete.
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(output_dir))
    _stage(f"bundle written to {output_dir} in {timings['total_s']:.0f} s", log)
    return manifest
