"""Feedback load run: score images, send their ground truth, check GET /metrics/live.

For each backend (a SQLite file, and a PostgreSQL cluster started here from Debian's
binaries, :mod:`tools.local_postgres`) a real service process (``python -m app.main`` on
loopback) is started on a fresh database. ``concurrency`` client threads then take the
images one by one: POST /score, and right away POST /feedback with that answer's
request id and the image's truth (its MNIST label, or ``ood`` for a notMNIST letter).
Afterwards GET /metrics/live must report every image scored and labelled, and its AUROC
of each score on each comparison must equal the AUROC computed here, with scikit-learn,
from the answers the clients received and the labels they sent (to 1e-9).

Then the scoring latency with recording on and off is measured side by side: a second
service with GRADUNC_STORE_ENABLED=false runs next to the first, and single images are
posted to the two in alternation (one client), so both see the same machine state.

    python -m tools.feedback_load --images 10000 --concurrency 32 --json out/feedback.json

The exit status is 0 when both backends had no errors, every feedback item was matched,
the counts agree and the AUROCs agree; latency is reported, never judged.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from tools.harness import REPO_ROOT, ServerProcess, png_bytes

__all__ = ["LoadImages", "LoadResult", "load_images", "main", "run_backend"]

#: Largest |live - offline| AUROC accepted.
AUROC_TOLERANCE = 1e-9
#: The scores every row has and their orientation as confidences (app.store.quality).
CONFIDENCE_SIGN = {"p_correct": 1.0, "p_ood": -1.0, "softmax_baseline": 1.0, "entropy": -1.0}


@dataclass(frozen=True)
class LoadImages:
    """PNG files with their truth: a class index, or None for an out-of-distribution one."""

    pngs: list[bytes]
    labels: list[int | None]


def load_images(count: int, ood_share: float, data_dir: Path | str | None = None) -> LoadImages:
    """``count`` images: MNIST test digits, and notMNIST letters for ``ood_share`` of them
    (uniform noise where notMNIST is absent), interleaved, deterministic."""
    from training.data.base import MissingDataError, resolve_data_dir
    from training.data.mnist import load_mnist

    directory = resolve_data_dir(data_dir)
    ood_count = round(count * ood_share)
    digits = load_mnist(directory, "test")
    repeats = -(-(count - ood_count) // len(digits.images))
    in_images = np.concatenate([digits.images] * repeats)[: count - ood_count]
    in_labels = np.concatenate([digits.labels] * repeats)[: count - ood_count]
    try:
        from training.data.notmnist import load_notmnist

        letters = load_notmnist(directory).images
    except MissingDataError:
        letters = np.random.default_rng(0).integers(0, 256, (ood_count, 28, 28), dtype=np.uint8)
    picks = np.random.default_rng(1).choice(
        len(letters), ood_count, replace=ood_count > len(letters)
    )
    ood_images = letters[picks]
    order = np.random.default_rng(2).permutation(count)
    images = np.concatenate([in_images, ood_images])[order]
    labels: list[int | None] = [int(v) for v in in_labels] + [None] * ood_count
    return LoadImages([png_bytes(image) for image in images], [labels[k] for k in order])


@dataclass
class LoadResult:
    backend: str
    images: int
    concurrency: int
    seconds: float = 0.0
    score_errors: list[str] = field(default_factory=list)
    feedback_errors: list[str] = field(default_factory=list)
    matched: int = 0
    unknown: int = 0
    live_counts: dict[str, int] = field(default_factory=dict)
    expected_counts: dict[str, int] = field(default_factory=dict)
    auroc_live: dict[str, float | None] = field(default_factory=dict)
    auroc_offline: dict[str, float | None] = field(default_factory=dict)
    max_auroc_difference: float | None = None
    latency_ms: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        figures = asdict(self)
        figures["score_errors"] = self.score_errors[:20]
        figures["feedback_errors"] = self.feedback_errors[:20]
        figures["ok"] = self.ok
        return figures


class _Client:
    """One keep-alive HTTP connection to the service."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self.connection.request(method, path, body, {"Content-Type": content_type})
                response = self.connection.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException):
                self.connection.close()  # the server closed an idle keep-alive: reconnect
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


def _run_clients(port: int, images: LoadImages, concurrency: int, result: LoadResult) -> list:
    """Score every image and send its feedback at once; the answers, in image order."""
    answers: list[dict[str, Any] | None] = [None] * len(images.pngs)
    next_index = iter(range(len(images.pngs)))
    lock = threading.Lock()

    def worker() -> None:
        client = _Client(port)
        try:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                status, body = client.request("POST", "/score", images.pngs[index], "image/png")
                if status != 200:
                    with lock:
                        result.score_errors.append(f"image {index}: {status} {body[:200]!r}")
                    continue
                answer = json.loads(body)
                answers[index] = answer
                label = images.labels[index]
                item = {"request_id": answer["request_id"], "label": label, "ood": label is None}
                status, body = client.request(
                    "POST", "/feedback", json.dumps({"items": [item]}).encode(), "application/json"
                )
                with lock:
                    if status != 200:
                        result.feedback_errors.append(f"image {index}: {status} {body[:200]!r}")
                        continue
                    outcome = json.loads(body)
                    result.matched += outcome["matched"]
                    result.unknown += len(outcome["unknown"])
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def offline_aurocs(answers: Sequence[dict[str, Any]], labels: Sequence[int | None]) -> dict:
    """AUROC per comparison and score, from the client's side of the exchange."""
    ood = np.array([label is None for label in labels])
    truth = np.array([-1 if label is None else label for label in labels])
    prediction = np.array([answer["prediction"] for answer in answers])
    correct = ~ood & (prediction == truth)
    members = {"correct_vs_wrong": ~ood, "correct_vs_ood": correct | ood, "correct_vs_rest": None}
    aurocs: dict[str, float | None] = {}
    for comparison, mask in members.items():
        chosen = np.ones(len(labels), dtype=bool) if mask is None else mask
        for score, sign in CONFIDENCE_SIGN.items():
            values = sign * np.array([answer[score] for answer in answers], dtype=np.float64)
            positive = correct[chosen]
            key = f"{comparison}/{score}"
            defined = 0 < positive.sum() < positive.size
            aurocs[key] = float(roc_auc_score(positive, values[chosen])) if defined else None
    return aurocs


def check_live(live: dict[str, Any], answers: list, images: LoadImages, result: LoadResult) -> None:
    """Compare GET /metrics/live with what the clients saw; problems go to ``result``."""
    labels = images.labels
    truth_in = [(a, lab) for a, lab in zip(answers, labels, strict=True) if lab is not None]
    result.expected_counts = {
        "scored": len(answers),
        "labelled": len(answers),
        "labelled_in_distribution": len(truth_in),
        "labelled_ood": sum(label is None for label in labels),
        "correct": sum(a["prediction"] == lab for a, lab in truth_in),
    }
    result.live_counts = live["counts"]
    if result.live_counts != result.expected_counts:
        result.problems.append(f"counts {result.live_counts} != {result.expected_counts}")
    result.auroc_offline = offline_aurocs(answers, labels)
    result.auroc_live = {
        f"{record['comparison']}/{record['score']}": record["auroc"]
        for record in live["quality"]
        if record["score"] in CONFIDENCE_SIGN
    }
    differences = []
    for key, offline in result.auroc_offline.items():
        served = result.auroc_live.get(key)
        if (offline is None) != (served is None):
            result.problems.append(f"{key}: live AUROC {served}, offline {offline}")
        elif offline is not None and served is not None:
            differences.append(abs(served - offline))
    result.max_auroc_difference = max(differences) if differences else None
    if differences and max(differences) > AUROC_TOLERANCE:
        result.problems.append(f"live and offline AUROC differ by up to {max(differences):.3g}")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` and its threads (/proc/<pid>/stat)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_latency(on: ServerProcess, off: ServerProcess, pngs: Sequence[bytes], rounds: int):
    """/score latency with recording on and off, posted alternately by one client.

    Reported: each server's median, the difference of the medians, the median of the
    paired differences (each on request against the off request next to it, which
    cancels slow drifts of the machine's load), and each server's CPU time per request.
    """
    clients = {"recording_on": _Client(on.port), "recording_off": _Client(off.port)}
    pids = {"recording_on": on.pid, "recording_off": off.pid}
    timings: dict[str, list[float]] = {name: [] for name in clients}
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    try:
        for index in range(rounds):
            png = pngs[index % len(pngs)]
            names = list(clients) if index % 2 == 0 else list(reversed(clients))
            for name in names:
                start = time.perf_counter()
                status, _ = clients[name].request("POST", "/score", png, "image/png")
                elapsed = (time.perf_counter() - start) * 1000
                timings[name].append(elapsed if status == 200 else math.nan)
    finally:
        for client in clients.values():
            client.close()
    cpu = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    on_ms, off_ms = np.array(timings["recording_on"]), np.array(timings["recording_off"])
    kept = np.isfinite(on_ms) & np.isfinite(off_ms)
    return {
        "recording_on_median": round(float(np.median(on_ms[kept])), 3),
        "recording_off_median": round(float(np.median(off_ms[kept])), 3),
        "difference_of_medians": round(float(np.median(on_ms[kept]) - np.median(off_ms[kept])), 3),
        "median_paired_difference": round(float(np.median(on_ms[kept] - off_ms[kept])), 3),
        "cpu_ms_per_request_on": round(cpu["recording_on"] * 1000 / rounds, 3),
        "cpu_ms_per_request_off": round(cpu["recording_off"] * 1000 / rounds, 3),
        "requests_each": int(kept.sum()),
    }


def run_backend(
    backend: str,
    database_url: str,
    images: LoadImages,
    *,
    concurrency: int,
    bundle_dir: Path,
    work_dir: Path,
    latency_rounds: int = 0,
    settings: dict[str, object] | None = None,
) -> LoadResult:
    """The whole run against one database; see the module docstring."""
    result = LoadResult(backend=backend, images=len(images.pngs), concurrency=concurrency)
    common = {"log_level": "warning", **(settings or {})}
    server = ServerProcess(
        bundle_dir, work_dir / f"server-{backend}.log", {**common, "database_url": database_url}
    )
    with server:
        server.wait_ready()
        start = time.perf_counter()
        answers = _run_clients(server.port, images, concurrency, result)
        result.seconds = round(time.perf_counter() - start, 2)
        if result.score_errors or result.feedback_errors:
            result.problems.append(
                f"{len(result.score_errors)} scoring and {len(result.feedback_errors)} "
                "feedback errors"
            )
        if result.matched != len(images.pngs) or result.unknown:
            result.problems.append(
                f"{result.matched} of {len(images.pngs)} feedback items matched, "
                f"{result.unknown} unknown"
            )
        status, _, body = server.get("/metrics/live", timeout_s=300)
        if status != 200:
            result.problems.append(f"GET /metrics/live answered {status}: {body[:300]!r}")
        elif all(answer is not None for answer in answers):
            check_live(json.loads(body), answers, images, result)
        if latency_rounds:
            off = ServerProcess(
                bundle_dir,
                work_dir / f"server-{backend}-off.log",
                {**common, "store_enabled": "false"},
            )
            with off:
                off.wait_ready()
                result.latency_ms = measure_latency(server, off, images.pngs, latency_rounds)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.feedback_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", type=int, default=10_000, help="images to score (10000)")
    parser.add_argument("--concurrency", type=int, default=32, help="client threads (32)")
    parser.add_argument(
        "--ood-share", type=float, default=0.2, help="share of notMNIST letters (0.2)"
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=("sqlite", "postgresql"),
        help="database to run against; repeat for both (default: both)",
    )
    parser.add_argument(
        "--latency-rounds", type=int, default=500, help="requests per server, on and off (500)"
    )
    parser.add_argument("--bundle-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--data-dir", type=Path, default=None, help="data sets (GRADUNC_DATA_DIR)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tools.local_postgres import LocalPostgres

    args = parse_args(argv)
    images = load_images(args.images, args.ood_share, args.data_dir)
    results = []
    with tempfile.TemporaryDirectory(prefix="gradunc-feedback-load-") as work:
        work_dir = Path(work)
        for backend in args.backend or ["sqlite", "postgresql"]:
            postgres = None
            if backend == "postgresql":
                postgres = LocalPostgres().start()
                url = postgres.create_database("feedback_load")
            else:
                url = f"sqlite:///{work_dir / 'live.sqlite3'}"
            try:
                result = run_backend(
                    backend,
                    url,
                    images,
                    concurrency=args.concurrency,
                    bundle_dir=args.bundle_dir,
                    work_dir=work_dir,
                    latency_rounds=args.latency_rounds,
                )
            finally:
                if postgres is not None:
                    postgres.cleanup()
            print(json.dumps(result.as_dict(), indent=2), flush=True)
            results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
