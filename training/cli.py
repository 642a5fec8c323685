"""Command-line interface of the offline pipeline: ``python -m training <command>``.

Commands: ``data-check`` (which sources were found, counts, checksums; or a user's own
ImageFolder), ``train`` (the ensemble), ``build`` (a whole model bundle, from MNIST or from
``--dataset DIR``), ``keygen`` / ``sign`` (bundle signatures) and ``benchmark`` (the
scorer benchmark).

Exit status: 0 on success, 1 when ``data-check`` finds a source missing or broken, 2 on
an error (a bad option, data that cannot be read), with the message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import BuildConfig, TrainingConfig
from training.data.base import DATA_DIR_ENV, DataError, resolve_data_dir
from training.overrides import apply_overrides


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"folder holding mnist/, notmnist/, omniglot/, cifar10/ (default: ${DATA_DIR_ENV}, "
        "else ../shared/datasets beside the repository)",
    )


#: The sources a default build reads (the known concept and every unknown concept of
#: ``training.bundle_builder.UNKNOWN_CONCEPTS``); ``data-check`` fails when one is missing.
BUILD_SOURCES: tuple[str, ...] = (
    "mnist",
    "mnist-train",
    "mnist-test",
    "notmnist",
    "omniglot-latin",
    "omniglot-other",
    "cifar10",
    "uniform-noise",
    "normal-noise",
)


def _add_no_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the SHA-256 of known data files (MNIST, notMNIST, Omniglot, "
        "CIFAR-10) against the official and shared copies: for a different but valid copy",
    )


def _add_dataset(parser: argparse.ArgumentParser) -> None:
    from training.data.imagefolder import DEFAULT_TEST_FRACTION, IMAGE_SUFFIXES

    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        metavar="DIR",
        help="your own data set instead of MNIST: DIR/<class>/<image> (class names are the "
        "folder names; images " + ", ".join(IMAGE_SUFFIXES) + ", any size and colour, "
        "preprocessed as the service does), or DIR/train/<class>/... plus DIR/test/<class>/... "
        "for an explicit test split",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        help="without DIR/test/: the share of each class drawn (seeded) as the test split "
        f"(default {DEFAULT_TEST_FRACTION:.4g})",
    )


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = TrainingConfig()
    parser.add_argument(
        "--members",
        "--ensemble-size",
        dest="ensemble_size",
        type=int,
        default=defaults.ensemble_size,
        help="ensemble size: number of members, each with its own split and seed "
        f"(default {defaults.ensemble_size})",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=defaults.optim.max_epochs,
        help="most epochs per member; early stopping usually ends sooner "
        f"(default {defaults.optim.max_epochs})",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the whole ensemble (default 0)"
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=defaults.split.train_size,
        help="training images per member; 0 uses all that the split leaves (default 0)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any field of the configuration tree, e.g. --set optim.learning_rate=0.01, "
        "--set heads.logistic_c=0.2, --set feature_space.knn_k=5 (repeatable; sections: "
        "training (its fields may be named directly), evaluation, feature_space, heads, "
        "concepts; see training/config.py)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device that trains the members: cpu, cuda or cuda:N (default cpu); "
        "everything after training runs on the CPU",
    )


def _add_ray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="train the members and run the engine passes as parallel Ray tasks "
        "(pip install '.[ray]'): 'local' starts "
        "Ray on this machine, 'auto' joins this machine's cluster, or host:port of a head "
        "node; the bundle is the same as a local build's (default: train here, in turn)",
    )
    parser.add_argument(
        "--ray-cpus-per-member", type=float, default=1.0, help="CPUs a member's task asks for"
    )
    parser.add_argument(
        "--ray-gpus-per-member",
        type=float,
        default=0.0,
        help="GPUs a member's task asks for (with --device cuda)",
    )
    parser.add_argument(
        "--ray-cpus-per-extraction-task",
        type=float,
        default=1.0,
        help="CPUs a task of the engine passes (features, statistics, ensemble views) asks for",
    )


def _ray_options(args: argparse.Namespace) -> dict:
    from training.ray_training import RayResources

    resources = RayResources(
        cpus=args.ray_cpus_per_member,
        gpus=args.ray_gpus_per_member,
        extraction_cpus=args.ray_cpus_per_extraction_task,
    )
    return {"ray_address": args.ray_address, "ray_resources": resources}


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is much faster when other "
        "processes share the cores, as torch's thread pool stalls under contention",
    )


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The whole configuration tree with the flags and every ``--set`` applied."""
    config = apply_overrides(
        BuildConfig(),
        [
            f"ensemble_size={args.ensemble_size}",
            f"seed={args.seed}",
            f"optim.max_epochs={args.epochs}",
            f"split.train_size={args.train_size}",
        ],
    )
    return apply_overrides(config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Offline pipeline: data, the paper's CNN ensemble, scorer graphs, evaluation "
        "and model bundles.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "data-check",
        help="list which data sources were found, with counts and checksums; exits 1 when a "
        "source a build needs is missing or broken",
    )
    _add_data_dir(check)
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument(
        "--dataset",
        type=Path,
        default=None,
        metavar="DIR",
        help="check your own ImageFolder instead (reads every image): classes, counts, the "
        "test split; the other sources are then optional",
    )
    check.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="with --dataset: as for build (default: build's default)",
    )
    _add_no_verify(check)

    train = commands.add_parser("train", help="train the CNN ensemble (resumes where it stopped)")
    _add_data_dir(train)
    _add_dataset(train)
    _add_config_options(train)
    _add_no_verify(train)
    train.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        help="folder for member_<k>.safetensors and member_<k>.json",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads(train)
    _add_ray(train)

    build = commands.add_parser(
        "build",
        help="build a whole model bundle: train, export, features, meta classifiers, report",
    )
    _add_data_dir(build)
    _add_dataset(build)
    build.add_argument(
        "--known-unknowns",
        type=Path,
        default=None,
        metavar="DIR",
        help="images that are none of the classes (any layout, read recursively): half fit "
        "the p_ood head as the concept user_known_unknowns, half evaluate it",
    )
    _add_config_options(build)
    _add_no_verify(build)
    build.add_argument(
        "--output-dir", type=Path, required=True, help="the bundle folder, e.g. models/default"
    )
    build.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="folder for checkpoints and the feature cache (default: <output-dir>.work); "
        "a rerun resumes from it",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads(build)
    _add_ray(build)

    regraph = commands.add_parser(
        "regraph",
        help="export a bundle's scorer graphs again with this code (faster graphs, same "
        "answers; refused if any answer would change)",
    )
    regraph.add_argument(
        "--bundle-dir", type=Path, required=True, help="the bundle folder, e.g. models/default"
    )
    _add_data_dir(regraph)
    _add_dataset(regraph)
    _add_no_verify(regraph)
    _add_threads(regraph)

    keygen = commands.add_parser(
        "keygen", help="write a new Ed25519 key pair for signing bundles (PEM files)"
    )
    keygen.add_argument(
        "--private-key", type=Path, required=True, help="where to write the private key (0600)"
    )
    keygen.add_argument(
        "--public-key",
        type=Path,
        required=True,
        help="where to write the public key (what GRADUNC_BUNDLE_PUBLIC_KEY points at)",
    )
    sign = commands.add_parser(
        "sign", help="sign a bundle's manifest with an Ed25519 private key (manifest.sig)"
    )
    sign.add_argument("bundle_dir", type=Path, help="the bundle folder, e.g. models/default")
    sign.add_argument("--key", type=Path, required=True, help="the private key (PEM)")

    commands.add_parser(
        "benchmark",
        help="scorer benchmark (all options: python -m training.benchmark --help)",
        add_help=False,
    )
    return parser


def _check_dataset(args: argparse.Namespace) -> dict:
    """A user's ImageFolder, read whole: what ``data-check --dataset`` reports."""
    from training.data.imagefolder import DEFAULT_TEST_FRACTION, load_image_folder

    fraction = DEFAULT_TEST_FRACTION if args.test_fraction is None else args.test_fraction
    dataset = load_image_folder(args.dataset, fraction)
    counts = {name: {"train": 0, "test": 0} for name in dataset.class_names}
    for row, label in enumerate(dataset.labels):
        part = "train" if row < dataset.num_train else "test"
        counts[dataset.class_names[label]][part] += 1
    return {
        "dataset": str(args.dataset),
        "classes": counts,
        "train_images": int(dataset.num_train),
        "test_images": int(len(dataset) - dataset.num_train),
    }


def run_data_check(args: argparse.Namespace) -> int:
    from training.data.sources import check_sources

    data_dir = resolve_data_dir(args.data_dir)
    dataset = _check_dataset(args) if args.dataset is not None else None
    checks = check_sources(data_dir, verify=not args.no_verify)
    # With a dataset of one's own the other sources are optional: a build skips them.
    required = () if dataset is not None else BUILD_SOURCES
    missing = [c.name for c in checks if not c.found and c.name in required]
    broken = [c.name for c in checks if c.found and not c.ok]
    if args.json:
        result = {"sources": [check.to_dict() for check in checks], "dataset": dataset}
        print(json.dumps(result if dataset is not None else result["sources"], indent=2))
    else:
        if dataset is not None:
            print(
                f"data set {dataset['dataset']}: {len(dataset['classes'])} classes, "
                f"{dataset['train_images']} training and {dataset['test_images']} test images"
            )
            for name, count in dataset["classes"].items():
                print(f"  {name:<16} {count['train']:>7} train {count['test']:>7} test")
        print(f"data directory: {data_dir}")
        for check in checks:
            if check.ok:
                status = f"{check.count:>7} images"
            elif check.found:
                status = f"broken: {check.error}"
            else:
                optional = "" if check.name in required else " (optional)"
                status = f"missing{optional}: {check.error}"
            print(f"  {check.name:<16} {status}")
            for file in check.files:
                print(f"      {file.path}  sha256 {file.sha256}")
    if missing or broken:
        problems = [f"missing: {', '.join(missing)}"] if missing else []
        problems += [f"broken: {', '.join(broken)}"] if broken else []
        hint = ""
        if any("SHA-256 mismatch" in (c.error or "") for c in checks):
            hint = " (a different but valid copy of a file: add --no-verify)"
        print(f"error: sources {'; '.join(problems)}{hint}", file=sys.stderr)
        return 1
    return 0


def _load_known(args: argparse.Namespace, config):
    """The known concept (MNIST or ``--dataset``) and the training configuration fitted to it."""
    from training.data.imagefolder import fit_split_sizes, load_image_folder
    from training.data.mnist import load_mnist

    if args.dataset is None:
        return load_mnist(resolve_data_dir(args.data_dir), verify=not args.no_verify), config
    known = load_image_folder(args.dataset, args.test_fraction)
    return known, fit_split_sizes(config, known.num_train, str(args.dataset))


def run_train(args: argparse.Namespace) -> int:
    from training.train import resolve_device, train_ensemble

    config = config_from_args(args)
    _set_threads(args)
    resolve_device(args.device)  # a clear error before any data is read
    known, training = _load_known(args, config.training)
    records = train_ensemble(
        training,
        known,
        args.output_dir,
        progress=not args.no_progress,
        device=args.device,
        **_ray_options(args),
    )
    accuracies = [record["test_accuracy"] for record in records]
    print(f"{len(records)} members, test accuracy " + ", ".join(f"{a:.4f}" for a in accuracies))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from training.bundle_builder import build_bundle
    from training.train import resolve_device

    config = config_from_args(args)
    _set_threads(args)
    resolve_device(args.device)  # a clear error before any data is read
    build_bundle(
        config=config,
        data_dir=resolve_data_dir(args.data_dir),
        output_dir=args.output_dir,
        work_dir=args.work_dir,
        progress=not args.no_progress,
        dataset_dir=args.dataset,
        known_unknowns_dir=args.known_unknowns,
        test_fraction=args.test_fraction,
        device=args.device,
        verify=not args.no_verify,
        **_ray_options(args),
    )
    return 0


def run_regraph(args: argparse.Namespace) -> int:
    from scoring.bundle import BundleError, load_bundle
    from training.regraph import CHECK_IMAGES, regraph_bundle

    _set_threads(args)
    try:
        load_bundle(args.bundle_dir)  # a clear error before any data is read
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    known, _ = _load_known(args, TrainingConfig())
    test_images = known.images[known.num_train :] if known.num_train is not None else known.images
    try:
        result = regraph_bundle(args.bundle_dir, test_images[:CHECK_IMAGES])
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.bundle_dir}: {len(result['export_checks'])} graphs re-exported, answers kept")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    from scoring.signing import generate_key_pair

    key = generate_key_pair(args.private_key, args.public_key)
    print(f"key {key}: private key {args.private_key}, public key {args.public_key}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from scoring.bundle import BundleError
    from scoring.signing import load_private_key, sign_bundle

    try:
        load_private_key(args.key)  # a clear error before anything is written
        signature = sign_bundle(args.bundle_dir, args.key)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"signed {args.bundle_dir / 'manifest.json'}: {signature}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:
        from training.benchmark import main as benchmark_main

        return benchmark_main(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {
        "data-check": run_data_check,
        "train": run_train,
        "build": run_build,
        "regraph": run_regraph,
        "keygen": run_keygen,
        "sign": run_sign,
    }
    try:
        return handlers[args.command](args)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
