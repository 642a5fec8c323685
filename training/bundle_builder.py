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

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import joblib
import numpy as np

from scoring.bundle import (
    FEATURE_SPACE_DIR,
    HEADS_PATH,
    REFERENCE_PATH,
    REPORT_DIR,
    BundleManifest,
    write_manifest,
)
from scoring.scores import FeatureSpaceStatistics
from training.config import BuildConfig, ConceptConfig, TrainingConfig
from training.data.base import DataError, Dataset, MissingDataError
from training.data.imagefolder import (
    DEFAULT_TEST_FRACTION,
    fit_split_sizes,
    load_image_files,
    load_image_folder,
)
from training.data.mnist import load_mnist
from training.data.sources import load_source
from training.data.synthesized import reframe, synthesize_outliers
from training.evaluation.feature_cache import EngineFeatureExtractor
from training.extraction import (
    Extractor,
    GraphFiles,
    LocalExtractor,
    RayExtractor,
    join_rows,
    member_feature_inputs,
)
from training.feature_space import fit_feature_space
from training.train import known_splits, load_member, split_of, train_ensemble

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
#: Intra-op threads of the build's engines, in the driver and in Ray tasks alike: fixed
#: so that a build's features do not depend on the cores of the machine that runs a pass.
ENGINE_THREADS = 2
#: The concept a build's ``known_unknowns_dir`` (``--known-unknowns DIR``) becomes: half
#: of it joins the p_ood head's known unknowns, the other half evaluates it.
USER_KNOWN_UNKNOWNS = "user_known_unknowns"


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
    data_dir: Path,
    seed: int,
    max_concept_images: int | None = None,
    concepts: ConceptConfig | None = None,
    dataset_dir: Path | None = None,
    known_unknowns_dir: Path | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    verify: bool = True,
    log=print,
) -> tuple[Dataset, dict[str, Dataset]]:
    """The pooled known concept and every unknown concept, noise generated from ``seed``.

    ``max_concept_images`` caps each unknown concept with a seeded subset (quick builds
    and tests); None evaluates on every image. ``dataset_dir``: the known concept is a
    user's ImageFolder (:mod:`training.data.imagefolder`) instead of MNIST, and an unknown
    concept whose files are not in ``data_dir`` is skipped (logged) rather than an error.
    ``known_unknowns_dir``: its images become the :data:`USER_KNOWN_UNKNOWNS` concept.
    ``verify`` checks the SHA-256 of known data files.
    """
    concepts = concepts or ConceptConfig()
    if dataset_dir is None:
        known = load_mnist(data_dir, verify=verify)
    else:
        known = load_image_folder(dataset_dir, test_fraction)
    unknown = {}
    for concept, source in UNKNOWN_CONCEPTS.items():
        count = concepts.noise_images if source.endswith("noise") else None
        try:
            dataset = load_source(source, data_dir, seed=seed, count=count, verify=verify)
        except MissingDataError as error:
            if dataset_dir is None:
                raise
            log(f"unknown concept {concept} skipped, its data is not there: {error}")
            continue
        unknown[concept] = _capped(dataset, max_concept_images, seed)
    if known_unknowns_dir is not None:
        unknown[USER_KNOWN_UNKNOWNS] = _capped(
            load_image_files(known_unknowns_dir, name=USER_KNOWN_UNKNOWNS), max_concept_images, seed
        )
    return known, unknown


def _capped(dataset: Dataset, cap: int | None, seed: int) -> Dataset:
    if cap is not None and len(dataset) > cap:
        dataset = dataset.subset(
            np.sort(np.random.default_rng(seed).permutation(len(dataset))[:cap])
        )
    return dataset


def fit_to_concepts(config: BuildConfig, unknown: dict[str, Dataset]) -> BuildConfig:
    """``config`` with the p_ood head's known unknowns limited to the concepts loaded, and
    the :data:`USER_KNOWN_UNKNOWNS` concept added where there is one: half of it (seeded)
    for fitting, in the paper-level study as well, and half for evaluation.

    Unchanged for a default build, which has every concept.
    """
    heads, evaluation = config.heads, config.evaluation
    known_unknowns = tuple(c for c in heads.known_unknowns if c in unknown or c == "synthesized")
    user = unknown.get(USER_KNOWN_UNKNOWNS)
    if user is not None:
        if len(user) < 2:
            raise DataError(
                f"{USER_KNOWN_UNKNOWNS}: {len(user)} image; known unknowns need at least 2 "
                "(half fit the p_ood head, half evaluate it)"
            )
        known_unknowns += (USER_KNOWN_UNKNOWNS,)
        evaluation = dataclasses.replace(
            evaluation,
            known_unknown_train_counts=(
                *evaluation.known_unknown_train_counts,
                (USER_KNOWN_UNKNOWNS, len(user) // 2),
            ),
            known_unknown_sets=(
                *evaluation.known_unknown_sets,
                (f"validation+{USER_KNOWN_UNKNOWNS}", (USER_KNOWN_UNKNOWNS,)),
            ),
        )
    heads = dataclasses.replace(heads, known_unknowns=known_unknowns)
    return dataclasses.replace(config, heads=heads, evaluation=evaluation)


def provenance(known: Dataset, unknown: dict[str, Dataset]) -> dict[str, list[dict]]:
    return {
        dataset.name: [{"path": p.path, "sha256": p.sha256} for p in dataset.provenance]
        for dataset in [known, *unknown.values()]
    }


def _stage(message: str, log) -> float:
    log(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {message}")
    return time.perf_counter()


def evaluation_config(config, max_concept_images: int | None):
    """The protocol's configuration; a capped build also caps the known-unknown training
    parts at a third of each concept so that most of it stays for evaluation."""
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


def as_build_config(config: BuildConfig | TrainingConfig) -> BuildConfig:
    """A whole :class:`BuildConfig`; a bare training configuration gets default sections."""
    if isinstance(config, TrainingConfig):
        return BuildConfig(training=config)
    return config


def _cap(images: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or len(images) <= cap:
        return images
    return images[np.sort(np.random.default_rng(seed).permutation(len(images))[:cap])]


def fit_member_statistics(
    model, graph_path: Path, images: np.ndarray, labels: np.ndarray, config: BuildConfig
) -> FeatureSpaceStatistics:
    """Feature-space statistics of one member from its own graph on its training images."""
    return fit_statistics_of_members([model], [graph_path], [(images, labels)], config)[0]


def fit_statistics_of_members(
    models: Sequence,
    graph_paths: Sequence[Path],
    fit_sets: Sequence[tuple[np.ndarray, np.ndarray]],
    config: BuildConfig,
    extractor: Extractor | None = None,
) -> list[FeatureSpaceStatistics]:
    """Every member's feature-space statistics from its own graph on its ``(images,
    labels)``; the engine passes of all members run in one ``extractor`` call."""
    sets = {
        str(k): (GraphFiles.read([path], ENGINE_THREADS), images)
        for k, (path, (images, _)) in enumerate(zip(graph_paths, fit_sets, strict=True))
    }
    outputs = (extractor or LocalExtractor()).map(
        member_feature_inputs, join_rows, sets, config.evaluation.feature_batch_size
    )
    return [
        fit_feature_space(
            *outputs[str(k)],
            labels,
            model.dense.weight.detach().numpy(),
            model.dense.bias.detach().numpy(),
            config.feature_space,
        )
        for k, (model, (_, labels)) in enumerate(zip(models, fit_sets, strict=True))
    ]


def synthesized_outliers(
    known: Dataset, pool: np.ndarray, concepts: ConceptConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Outliers synthesized from two disjoint halves of the member pool: fitting, evaluation."""
    order = np.random.default_rng(seed + 20_000).permutation(pool)
    halves = order[: len(order) // 2], order[len(order) // 2 :]
    return tuple(
        synthesize_outliers(
            known.images[rows],
            known.labels[rows],
            count,
            seed + 30_000 + i,
            kinds=tuple(concepts.synthesis_kinds),
        )
        for i, (rows, count) in enumerate(
            zip(halves, (concepts.synthesized_train, concepts.synthesized_evaluation), strict=True)
        )
    )


def build_bundle(
    config: BuildConfig | TrainingConfig,
    data_dir: Path,
    output_dir: Path,
    work_dir: Path | None = None,
    progress: bool = True,
    log=print,
    max_concept_images: int | None = None,
    dataset_dir: Path | None = None,
    known_unknowns_dir: Path | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    device: str = "cpu",
    verify: bool = True,
    ray_address: str | None = None,
    ray_resources=None,
) -> dict:
    """Build the bundle in ``output_dir`` (replaced only at the end); returns the manifest.

    ``dataset_dir``, ``known_unknowns_dir``, ``test_fraction`` and ``verify``: see
    :func:`load_concepts`; with a ``dataset_dir``, default calibration and validation
    sizes too large for it are scaled (:func:`~training.data.imagefolder.fit_split_sizes`)
    and its class names are the bundle's. ``device`` trains the members there ("cuda").
    ``ray_address``/``ray_resources``: train the members as Ray tasks
    (:func:`training.train.train_ensemble`) and run the engine passes as Ray tasks
    (:class:`~training.extraction.RayExtractor`); the bundle is the same as a local build's.
    """
    extractor: Extractor = LocalExtractor()
    session: contextlib.AbstractContextManager = contextlib.nullcontext()
    if ray_address is not None:
        from training.ray_training import RayResources, ray_session

        ray_resources = ray_resources or RayResources()
        extractor = RayExtractor(ray_resources.extraction_cpus, log=log)
        session = ray_session(ray_address)
    with session:
        return _build_bundle(
            as_build_config(config),
            data_dir,
            Path(output_dir),
            work_dir,
            progress,
            log,
            max_concept_images,
            dataset_dir,
            known_unknowns_dir,
            test_fraction,
            device,
            verify,
            ray_address,
            ray_resources,
            extractor,
        )


def _build_bundle(
    config: BuildConfig,
    data_dir: Path,
    output_dir: Path,
    work_dir: Path | None,
    progress: bool,
    log,
    max_concept_images: int | None,
    dataset_dir: Path | None,
    known_unknowns_dir: Path | None,
    test_fraction: float,
    device: str,
    verify: bool,
    ray_address: str | None,
    ray_resources,
    extractor: Extractor,
) -> dict:
    from training.evaluation.concepts import split_known_unknowns
    from training.evaluation.protocol import MemberInput, run_evaluation
    from training.evaluation.report import write_report
    from training.evaluation.service_level import ensemble_views, run_service_level
    from training.scorer_graph import export_scorer_graph

    training = config.training
    work_dir = Path(work_dir) if work_dir else output_dir.with_name(output_dir.name + ".work")
    members_dir, staging = work_dir / "members", work_dir / "bundle"
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(f"loading data from {data_dir}", log)
    known, unknown = load_concepts(
        data_dir,
        training.seed,
        max_concept_images,
        config.concepts,
        dataset_dir=dataset_dir,
        known_unknowns_dir=known_unknowns_dir,
        test_fraction=test_fraction,
        verify=verify,
        log=log,
    )
    if dataset_dir is not None:
        training = fit_split_sizes(training, known.num_train, str(dataset_dir))
        if training.split != config.training.split:
            log(f"split sizes fitted to {known.num_train} training images: {training.split}")
    config = fit_to_concepts(dataclasses.replace(config, training=training), unknown)
    timings["data_s"] = time.perf_counter() - t

    t = _stage(f"training {training.ensemble_size} members in {members_dir}", log)
    records = train_ensemble(
        training,
        known,
        members_dir,
        progress=progress,
        log=log,
        device=device,
        ray_address=ray_address,
        ray_resources=ray_resources,
    )
    timings["training_s"] = time.perf_counter() - t

    t = _stage("exporting and checking the scorer graphs, fitting feature-space statistics", log)
    if staging.exists():
        shutil.rmtree(staging)
    for folder in ("graphs", "weights", "meta", FEATURE_SPACE_DIR, "reference"):
        (staging / folder).mkdir(parents=True)
    member_inputs, export_checks, splits = [], [], []
    models, graph_paths, fit_rows = [], [], []
    for member, record in enumerate(records):
        model, _ = load_member(members_dir, member)
        split = split_of(training, member, known)
        if split.digest() != record["split_digest"]:
            raise ValueError(
                f"member {member}: its split no longer matches the one it was trained on"
            )
        splits.append(split)
        graph_path = staging / "graphs" / f"member_{member}.onnx"
        check = export_scorer_graph(model, graph_path, known.images[split.test[:256]])
        export_checks.append({**check, "path": graph_path.relative_to(staging).as_posix()})
        for suffix in (".safetensors", ".json"):
            shutil.copy2(members_dir / f"member_{member}{suffix}", staging / "weights")
        fit_rows.append(
            _cap(split.train, config.feature_space.fit_images, training.member_seed(member))
        )
        models.append(model)
        graph_paths.append(graph_path)
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
    statistics = fit_statistics_of_members(
        models,
        graph_paths,
        [(known.images[rows], known.labels[rows]) for rows in fit_rows],
        config,
        extractor,
    )
    for member, member_statistics in enumerate(statistics):
        member_statistics.save(staging / FEATURE_SPACE_DIR / f"member_{member}.npz")
    timings["export_s"] = time.perf_counter() - t

    t = _stage("paper level: per-member features, meta classifiers, baselines", log)
    protocol = evaluation_config(config.evaluation, max_concept_images)
    sources = known_unknown_sources(unknown, training.seed, protocol.train_counts())
    paper = run_evaluation(
        member_inputs,
        sources,
        config=protocol,
        feature_extractor=EngineFeatureExtractor(
            graph_paths, protocol.feature_batch_size, extractor, ENGINE_THREADS
        ),
        report_dir=None,
        cache_dir=work_dir / "features",
        progress=progress,
    )
    timings["paper_level_s"] = time.perf_counter() - t

    t = _stage("service level: ensemble heads, calibration, threshold, ablations", log)
    evaluated, known_unknowns = split_known_unknowns(sources, protocol)
    pool = known_splits(training, known.num_train, len(known) - known.num_train).pool
    synthesized_train, synthesized_evaluation = synthesized_outliers(
        known, pool, config.concepts, training.seed
    )
    known_unknowns["synthesized"] = synthesized_train
    evaluated["synthesized"] = synthesized_evaluation
    if "notmnist" in evaluated:  # skipped where a user's build has no notMNIST files
        evaluated["notmnist_reframed"] = reframe(evaluated["notmnist"])
    calibration_rows, test_rows = splits[0].calibration, splits[0].test
    views = ensemble_views(
        GraphFiles.read(graph_paths, ENGINE_THREADS),
        statistics,
        {
            "calibration": known.images[calibration_rows],
            "test": known.images[test_rows],
            **{f"concept {name}": images for name, images in evaluated.items()},
            **{f"unknown {name}": known_unknowns[name] for name in config.heads.known_unknowns},
        },
        config.evaluation.feature_batch_size,
        extractor,
    )
    calibration, test = views["calibration"], views["test"]
    calibration.labels, test.labels = known.labels[calibration_rows], known.labels[test_rows]
    concept_views = {name: views[f"concept {name}"] for name in evaluated}
    unknown_views = {name: views[f"unknown {name}"] for name in config.heads.known_unknowns}
    held_out = {name: concept_views[name] for name in config.heads.known_unknowns}
    service = run_service_level(
        calibration, test, concept_views, unknown_views, held_out, config.heads, log=log
    )
    heads = service.heads
    joblib.dump(
        {
            "p_correct": heads.p_correct,
            "p_ood": heads.p_ood,
            "ood_threshold": heads.ood_threshold,
            "input_names": list(heads.input_names),
        },
        staging / HEADS_PATH,
    )
    (staging / REFERENCE_PATH).write_text(json.dumps(service.reference) + "\n")
    timings["service_level_s"] = time.perf_counter() - t

    t = _stage("writing the report", log)
    report = paper.report
    report["service_level"] = {
        **service.report(),
        "concepts": {
            name: {
                "evaluation_images": int(len(evaluated[name])),
                "training_images": int(len(known_unknowns.get(name, ()))),
                "seen": name in config.heads.known_unknowns,
            }
            for name in evaluated
        },
        "splits": {
            "test": int(len(test_rows)),
            "calibration": int(len(calibration_rows)),
            "member_pool": int(len(pool)),
        },
    }
    write_report(paper, staging / REPORT_DIR)
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    graphs = _graph_paths(records)
    content = hashlib.sha256()
    for relative in [*graphs, HEADS_PATH]:
        content.update((staging / relative).read_bytes())
    manifest = write_manifest(
        staging,
        BundleManifest(
            name=output_dir.name,
            model_version=f"{output_dir.name}-{content.hexdigest()[:12]}",
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            code_revision=code_revision(),
            config=config.to_dict(),
            data_provenance=provenance(known, unknown),
            class_names=known.class_names or [str(digit) for digit in range(10)],
            graphs=graphs,
            feature_space=[f"{FEATURE_SPACE_DIR}/member_{k}.npz" for k in range(len(records))],
            heads=HEADS_PATH,
            heads_orientation={
                "p_correct": "predict_proba(head_inputs)[:, 1]",
                "p_ood": "1 - predict_proba(head_inputs)[:, 1]",
            },
            head_inputs=list(heads.input_names),
            ood_threshold=heads.ood_threshold,
            ood_threshold_rule=service.info["threshold"],
            head_selection=service.info,
            reference=REFERENCE_PATH,
            members=[
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
            export_checks=export_checks,
            build_seconds={key: round(value, 1) for key, value in timings.items()},
        ),
    )

    # Replace the old bundle only now that the new one is complete.
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(output_dir))
    _stage(f"bundle written to {output_dir} in {timings['total_s']:.0f} s", log)
    return manifest


def _graph_paths(records: list[dict]) -> list[str]:
    return [f"graphs/member_{member}.onnx" for member in range(len(records))]
