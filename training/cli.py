"""Command-line interface of the offline pipeline: ``python -m training <command>``.

Commands: ``data-check`` (which sources were found, counts, checksums), ``train`` (the
ensemble), ``build`` (a whole model bundle) and ``benchmark`` (the scorer benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import TrainingConfig
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


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = TrainingConfig()
    parser.add_argument(
        "--ensemble-size",
        type=int,
        default=defaults.ensemble_size,
        help="number of members, each with its own split and seed "
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
        help="override any configuration field, e.g. --set optim.learning_rate=0.01 "
        "(repeatable; see training/config.py for every field and its default)",
    )


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


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    config = apply_overrides(
        TrainingConfig(),
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
        "data-check", help="list which data sources were found, with counts and checksums"
    )
    _add_data_dir(check)
    check.add_argument("--json", action="store_true", help="print the result as JSON")

    train = commands.add_parser("train", help="train the CNN ensemble (resumes where it stopped)")
    _add_data_dir(train)
    _add_config_options(train)
    train.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        help="folder for member_<k>.safetensors and member_<k>.json",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads(train)

    build = commands.add_parser(
        "build",
        help="build a whole model bundle: train, export, features, meta classifiers, report",
    )
    _add_data_dir(build)
    _add_config_options(build)
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

    commands.add_parser(
        "benchmark",
        help="scorer benchmark (all options: python -m training.benchmark --help)",
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

        add_help=False,
    )
    return parser


def run_data_check(args: argparse.Namespace) -> int:
    from training.data.sources import check_sources

    data_dir = resolve_data_dir(args.data_dir)
    checks = check_sources(data_dir)
    if args.json:
        print(json.dumps([check.to_dict() for check in checks], indent=2))
    else:
        print(f"data directory: {data_dir}")
        for check in checks:
            if check.ok:
                status = f"{check.count:>7} images"
            elif check.found:
                status = f"broken: {check.error}"
            else:
                status = f"missing: {check.error}"
            print(f"  {check.name:<16} {status}")
            for file in check.files:
                print(f"      {file.path}  sha256 {file.sha256}")
    return 0 if any(check.found for check in checks) else 1


def run_train(args: argparse.Namespace) -> int:
    from training.data.mnist import load_mnist
    from training.train import train_ensemble

    config = config_from_args(args)
    _set_threads(args)
    known = load_mnist(resolve_data_dir(args.data_dir))
    records = train_ensemble(config, known, args.output_dir, progress=not args.no_progress)
    accuracies = [record["test_accuracy"] for record in records]
    print(f"{len(records)} members, test accuracy " + ", ".join(f"{a:.4f}" for a in accuracies))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from training.bundle_builder import build_bundle

    config = config_from_args(args)
    _set_threads(args)
    build_bundle(
        config=config,
        data_dir=resolve_data_dir(args.data_dir),
        output_dir=args.output_dir,
        work_dir=args.work_dir,
        progress=not args.no_progress,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:
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


        from training.benchmark import main as benchmark_main

        return benchmark_main(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {
        "data-check": run_data_check,
        "train": run_train,
        "build": run_build,
        "keygen": run_keygen,
        "sign": run_sign,
    }
    try:
        return handlers[args.command](args)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
