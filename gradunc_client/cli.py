"""``gradient-uncertainty score PATH...``: score image files and folders.

In process by default (the bundle's scorer, no server; ``--bundle-dir``), or against a
running service with ``--url``. Folders are walked recursively for image files; the
results come in the order of the paths given (folders sorted), one per image, as JSON
lines (the whole score object plus ``path``) or CSV (the top-level numbers, one column
per entry of ``scores``). An image that cannot be scored gets a record with ``error``
and the command exits 1 once all others are written; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gradunc_client import ScoringClient

__all__ = ["collect_images", "main", "plain"]

#: File suffixes taken from folders (a file named on the command line is always tried).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
#: CSV columns before the ``scores.<name>`` ones.
CSV_COLUMNS = (
    "path",
    "prediction",
    "label",
    "p_correct",
    "p_ood",
    "is_ood",
    "entropy",
    "softmax_baseline",
    "model_version",
    "request_id",
    "error",
)

Record = dict[str, Any]
#: Scores a list of image files; one record (score object or error) per file, in order.
Scorer = Callable[[list[Path]], list[Record]]


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Every image to score: files as given, folders walked (sorted, image suffixes only)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def plain(result: Any) -> Record:
    """A score object as plain JSON data: the runtime's dataclass or a dict, Nones left out."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        data = dataclasses.asdict(result)
    else:
        data = dict(result)
    return {key: value for key, value in data.items() if value is not None}


def _error(path: Path, message: str) -> Record:
    return {"path": str(path), "error": message}


def in_process_scorer(bundle_dir: Path, include_members: bool) -> Scorer:
    """The bundle's own scorer and the service's preprocessing, in this process."""
    import numpy as np

    from scoring.preprocessing import decode_image, prepare_image
    from scoring.runtime import UncertaintyScorer

    scorer = UncertaintyScorer.from_bundle(bundle_dir)

    def score(files: list[Path]) -> list[Record]:
        records: list[Record | None] = [None] * len(files)
        images, positions = [], []
        for index, path in enumerate(files):
            try:
                images.append(prepare_image(decode_image(path.read_bytes())))
                positions.append(index)
            except (OSError, ValueError) as error:  # ImageDecodeError is a ValueError
                records[index] = _error(path, f"cannot decode the image: {error}")
        if images:
            results = scorer.score(np.stack(images), include_members=include_members)
            for index, result in zip(positions, results, strict=True):
                records[index] = {"path": str(files[index]), **plain(result)}
        return [record for record in records if record is not None]

    return score


def remote_scorer(client: ScoringClient, include_members: bool) -> Scorer:
    """POST /score/batch with ``client``; a batch the service refuses is retried image by
    image, so that one bad file costs only its own record."""
    from gradunc_client import ScoringError

    def one(path: Path) -> Record:
        try:
            return {"path": str(path), **client.score(path, include_members=include_members)}
        except ScoringError as error:
            return _error(path, str(error))

    def score(files: list[Path]) -> list[Record]:
        try:
            results = client.score_batch(files, include_members=include_members)
        except ScoringError as error:
            if error.status >= 500 or error.status == 401:
                raise  # the service, not an image, is the problem
            return [one(path) for path in files]
        return [{"path": str(path), **result} for path, result in zip(files, results, strict=True)]

    return score


class _Writer:
    """JSON lines or CSV on ``out``; CSV columns are fixed by the first scored record."""

    def __init__(self, out: TextIO, output_format: str) -> None:
        self.out = out
        self.format = output_format
        self._csv: csv.DictWriter[str] | None = None
        self._score_names: list[str] = []

    def write(self, record: Record) -> None:
        if self.format == "jsonl":
            self.out.write(json.dumps(record) + "\n")
            return
        if self._csv is None:
            self._score_names = sorted(record.get("scores") or {})
            columns = [*CSV_COLUMNS, *(f"scores.{name}" for name in self._score_names)]
            self._csv = csv.DictWriter(self.out, columns, extrasaction="ignore")
            self._csv.writeheader()
        row = {key: record.get(key, "") for key in CSV_COLUMNS}
        for name in self._score_names:
            row[f"scores.{name}"] = (record.get("scores") or {}).get(name, "")
        self._csv.writerow(row)


@contextmanager
def _opened(output: str) -> Iterator[TextIO]:
    if output == "-":
        yield sys.stdout
        return
    with open(output, "w", newline="", encoding="utf-8") as handle:
        yield handle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradient-uncertainty",
        description="Client tools of the gradient-uncertainty scoring service.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    score = commands.add_parser(
        "score",
        help="score image files and folders",
        description=__doc__.split("\n\n", 1)[1].replace("``", "'"),
    )
    score.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    score.add_argument(
        "--url",
        help="score against the service at URL (e.g. http://127.0.0.1:8000) instead of "
        "in this process",
    )
    score.add_argument(
        "--api-key",
        default=os.environ.get("GRADUNC_API_KEY") or None,
        help="bearer token for --url (default: $GRADUNC_API_KEY)",
    )
    score.add_argument(
        "--bundle-dir",
        type=Path,
        default=None,
        help="bundle to score with in process (default: the bundle shipped with the package)",
    )
    score.add_argument(
        "--format", choices=("jsonl", "csv"), default="jsonl", help="output format (jsonl)"
    )
    score.add_argument("--output", "-o", default="-", help="output file (default: stdout)")
    score.add_argument(
        "--batch-size", type=int, default=64, help="images per engine call or request (64)"
    )
    score.add_argument(
        "--include-members", action="store_true", help="add each member's own scores (jsonl)"
    )
    score.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it goes to stderr)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {arguments.batch_size}")
    if arguments.url and arguments.bundle_dir:
        parser.error("--bundle-dir scores in process; it cannot be combined with --url")
    try:
        files = collect_images(arguments.paths)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not files:
        parser.error("no image files found in " + ", ".join(map(str, arguments.paths)))

    resources = ExitStack()
    if arguments.url:
        from gradunc_client import ScoringClient

        client = resources.enter_context(ScoringClient(arguments.url, api_key=arguments.api_key))
        scorer = remote_scorer(client, arguments.include_members)
    else:
        from app.config import DEFAULT_BUNDLE_DIR

        bundle_dir = arguments.bundle_dir or DEFAULT_BUNDLE_DIR
        if not (bundle_dir / "manifest.json").is_file():
            parser.error(f"no model bundle at {bundle_dir} (manifest.json is missing)")
        scorer = in_process_scorer(bundle_dir, arguments.include_members)

    from tqdm import tqdm

    failures = 0
    with (
        resources,
        _opened(arguments.output) as out,
        tqdm(
            total=len(files),
            unit="image",
            disable=True if arguments.no_progress else None,  # None: only on a terminal
            file=sys.stderr,
        ) as progress,
    ):
        writer = _Writer(out, arguments.format)
        for start in range(0, len(files), arguments.batch_size):
            chunk = files[start : start + arguments.batch_size]
            try:
                records = scorer(chunk)
            except Exception as error:  # the service or the bundle, not one image
                progress.close()
                print(f"gradient-uncertainty: {error}", file=sys.stderr)
                return 1
            for record in records:
                failures += "error" in record
                writer.write(record)
            out.flush()
            progress.update(len(chunk))
    if failures:
        print(f"gradient-uncertainty: {failures} of {len(files)} images failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
