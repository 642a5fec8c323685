"""Load and soak run: many clients against a real server process, every answer checked.

Starts the service (``python -m app.main``, :class:`tools.harness.ServerProcess`) on a
free loopback port with a small batch size and a small queue, so that the clients
outnumber what the batcher takes at once and backpressure (503 with Retry-After) really
happens. Then ``concurrency`` clients post MNIST digits (single images to POST /score,
every ``batch_every``-th request a few images to POST /score/batch) until the time or the
request budget runs out, whichever comes first. Every 200 is compared with the offline
``UncertaintyScorer`` for the same images (prediction equal, probabilities within 1e-5;
the p_ood and p_correct deviations are reported); every 503 must be problem+json with
Retry-After; anything else is an error. The server's resident memory (VmRSS from /proc)
is sampled throughout and reported as growth from the end of the warm-up to the end of
the run. Speed is reported, never judged.

    python -m tools.soak --bundle-dir models/default --minutes 10 --json out/soak.json

The exit status is 0 when there were no errors, no wrong answers, at least one 200 and
the memory growth stayed under ``--max-rss-growth-mib``. ``tests/test_load.py`` runs the
same code for about 20 seconds.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.harness import (
    REPO_ROOT,
    TOLERANCE,
    ServerProcess,
    expected_scores,
    mnist_test_digits,
    multipart_body,
    png_bytes,
    result_mismatch,
)

__all__ = ["LoadReport", "main", "rss_bytes", "run_load"]

PROBLEM_JSON = "application/problem+json"
MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS in /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected unit in /proc/{pid}/status: {line!r}")
            return int(value) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def head_deviation(served: Mapping[str, Any], expected: Mapping[str, Any]) -> float:
    """Largest difference of p_ood and p_correct between a served and the offline answer."""
    return max(
        abs(float(served.get(name, np.nan)) - float(expected[name]))
        for name in ("p_ood", "p_correct")
    )


# -- the load run --------------------------------------------------------------------


@dataclass
class LoadReport:
    """What one load run did; every count is of requests unless it says images."""

    requests: int = 0
    concurrency: int = 0
    duration_s: float = 0.0
    ok: int = 0
    backpressure_503: int = 0
    other_errors: int = 0
    wrong_results: int = 0
    images_scored: int = 0
    #: Largest |served - offline| of p_ood or p_correct over every image answered, and how
    #: many images differed by more than TOLERANCE (the batch an image is scored in should
    #: not change its answer; see the report of tests/test_load.py).
    max_head_deviation: float = 0.0
    head_deviations_over_tolerance: int = 0
    throughput_rps: float = 0.0
    images_per_s: float = 0.0
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_growth_mib: float | None = None
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Tally:
    """Counts shared by the client threads."""

    def __init__(self, max_examples: int = 10) -> None:
        self.lock = threading.Lock()
        self.report = LoadReport()
        self.max_examples = max_examples

    def add_head_deviations(self, deviations: Sequence[float]) -> None:
        with self.lock:
            report = self.report
            report.max_head_deviation = max(report.max_head_deviation, *deviations)
            report.head_deviations_over_tolerance += sum(d > TOLERANCE for d in deviations)

    def add(self, outcome: str, images: int = 0, example: str | None = None) -> None:
        with self.lock:
            report = self.report
            report.requests += 1
            if outcome == "ok":
                report.ok += 1
                report.images_scored += images
            elif outcome == "503":
                report.backpressure_503 += 1
            elif outcome == "wrong":
                report.wrong_results += 1
            else:
                report.other_errors += 1
            if example is not None and len(report.examples) < self.max_examples:
                report.examples.append(example)


def _check_503(headers: http.client.HTTPMessage, data: bytes) -> str | None:
    """Why a 503 is not a proper backpressure answer, or None if it is."""
    retry_after = headers.get("Retry-After")
    if retry_after is None or not retry_after.isdigit():
        return f"503 without a numeric Retry-After header (got {retry_after!r})"
    content_type = headers.get("Content-Type", "")
    if not content_type.startswith(PROBLEM_JSON):
        return f"503 with Content-Type {content_type!r}, not {PROBLEM_JSON}"
    try:
        problem = json.loads(data)
    except ValueError:
        return f"503 body is not JSON: {data[:200]!r}"
    if problem.get("status") != 503 or not problem.get("detail"):
        return f"503 problem lacks status or detail: {problem}"
    return None


def run_load(
    port: int,
    pngs: Sequence[bytes],
    expected: Sequence[Mapping[str, Any]],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    batch_every: int = 4,
    batch_images: int = 4,
    server_pid: int | None = None,
    request_timeout_s: float = 120,
    backoff_s: float = 0.02,
) -> LoadReport:
    """``concurrency`` clients posting ``pngs`` until ``duration_s`` or ``max_requests``.

    Request ``n`` posts image ``n % len(pngs)`` to /score, except every ``batch_every``-th
    request, which posts ``batch_images`` consecutive images to /score/batch. Each client
    keeps one connection open (reconnecting after an error) and pauses ``backoff_s`` after
    a 503: the point is to keep the queue full.
    """
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError(
            f"concurrency, duration_s and max_requests must be positive, got "
            f"{concurrency!r}, {duration_s!r}, {max_requests!r}"
        )
    tally = _Tally()
    counter = itertools.count()
    started = time.monotonic()
    deadline = started + duration_s

    def one_request(connection: http.client.HTTPConnection, number: int) -> None:
        is_batch = batch_every > 0 and number % batch_every == batch_every - 1
        count = batch_images if is_batch else 1
        indices = [(number + j) % len(pngs) for j in range(count)]
        if is_batch:
            path = "/score/batch"
            body, content_type = multipart_body(
                [("images", f"{i}.png", pngs[i]) for i in indices], boundary="gradunc-soak"
            )
        else:
            path, content_type, body = "/score", "image/png", pngs[indices[0]]
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        data = response.read()
        if response.status == 503:
            problem = _check_503(response.headers, data)
            tally.add("error" if problem else "503", example=problem)
            # A real client would wait Retry-After; a short pause keeps the queue full
            # without spending the cores on refusals.
            time.sleep(backoff_s)
            return
        if response.status != 200:
            tally.add("error", example=f"{path}: {response.status} {data[:300]!r}")
            return
        answer = json.loads(data)
        results = answer.get("results") if is_batch else [answer]
        if not isinstance(results, list) or len(results) != count:
            tally.add("wrong", example=f"{path}: {count} images, answer {str(answer)[:200]}")
            return
        for index, result in zip(indices, results, strict=True):
            why = result_mismatch(result, expected[index])
            if why is not None:
                tally.add("wrong", example=f"{path} image {index}: {why}")
                return
        tally.add_head_deviations(
            [head_deviation(r, expected[i]) for i, r in zip(indices, results, strict=True)]
        )
        tally.add("ok", images=count)

    def client() -> None:
        connection: http.client.HTTPConnection | None = None
        while time.monotonic() < deadline:
            number = next(counter)
            if number >= max_requests:
                break
            if connection is None:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", port, timeout=request_timeout_s
                )
            try:
                one_request(connection, number)
            except (OSError, http.client.HTTPException, ValueError) as error:
                tally.add("error", example=f"request {number}: {type(error).__name__}: {error}")
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    rss_samples: list[int] = []
    sampling = threading.Event()

    def sample_rss(pid: int) -> None:
        while not sampling.wait(0.25):
            try:
                rss_samples.append(rss_bytes(pid))
            except (OSError, ValueError):
                return

    rss_start = rss_bytes(server_pid) if server_pid is not None else None
    sampler = threading.Thread(target=sample_rss, args=(server_pid,), daemon=True)
    if server_pid is not None:
        sampler.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    elapsed = time.monotonic() - started
    sampling.set()
    if server_pid is not None:
        sampler.join()

    report = tally.report
    report.concurrency = concurrency
    report.duration_s = round(elapsed, 3)
    report.throughput_rps = round(report.ok / elapsed, 1)
    report.images_per_s = round(report.images_scored / elapsed, 1)
    if server_pid is not None and rss_start is not None:
        rss_end = rss_bytes(server_pid)
        report.rss_start_mib = round(rss_start / MIB, 1)
        report.rss_end_mib = round(rss_end / MIB, 1)
        report.rss_peak_mib = round(max([rss_start, rss_end, *rss_samples]) / MIB, 1)
        report.rss_growth_mib = round((rss_end - rss_start) / MIB, 1)
    return report


# -- the command line ----------------------------------------------------------------


def soak(args: argparse.Namespace) -> dict[str, Any]:
    images = mnist_test_digits(args.images, args.data_dir)
    pngs = [png_bytes(image) for image in images]
    expected = expected_scores(args.bundle_dir, images)
    settings = {
        "max_batch_size": args.max_batch_size,
        "max_batch_images": args.batch_images,
        "queue_max": args.queue_max,
        "log_level": "warning",
    }
    log_path = Path(args.log)
    with ServerProcess(args.bundle_dir, log_path, settings) as server:
        server.wait_ready()
        common = {
            "concurrency": args.concurrency,
            "batch_images": args.batch_images,
            "server_pid": server.pid,
        }
        warm_up = run_load(
            server.port, pngs, expected, duration_s=args.warm_up_s, max_requests=10**9, **common
        )
        duration_s = args.minutes * 60
        max_requests = args.max_requests or int(duration_s * 1000)
        report = run_load(
            server.port, pngs, expected, duration_s=duration_s, max_requests=max_requests, **common
        )
        exit_code = server.stop()
    return {
        "warm_up": warm_up.as_dict(),
        "run": report.as_dict(),
        "settings": settings,
        "bundle_dir": str(args.bundle_dir),
        "server_exit_code": exit_code,
        "server_log": str(log_path),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.soak",
        description="Load and soak run against a real server process on loopback: every "
        "answer checked against the offline scorer, backpressure and memory reported.",
    )
    parser.add_argument(
        "--bundle-dir",
        type=Path,
        default=REPO_ROOT / "models" / "default",
        help="bundle to serve and to score offline (default: models/default)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data directory with mnist/ (default: $GRADUNC_DATA_DIR or ../shared/datasets)",
    )
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="length of the measured run (default: 5)"
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=None,
        help="stop after this many requests even if time is left "
        "(default: 1000 per second of --minutes)",
    )
    parser.add_argument(
        "--warm-up-s",
        type=float,
        default=5.0,
        help="load before the measured run, not counted (default: 5)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=48, help="clients posting at the same time (default: 48)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="GRADUNC_MAX_BATCH_SIZE of the server (default: 16)",
    )
    parser.add_argument(
        "--queue-max",
        type=int,
        default=24,
        help="GRADUNC_QUEUE_MAX of the server, small so that backpressure happens (default: 24)",
    )
    parser.add_argument(
        "--batch-images",
        type=int,
        default=4,
        help="images per /score/batch request, every 4th request; also the "
        "server's GRADUNC_MAX_BATCH_IMAGES (default: 4)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=512,
        help="distinct MNIST test digits cycled through (default: 512)",
    )
    parser.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=100.0,
        help="fail when the server's RSS grew more than this (default: 100)",
    )
    parser.add_argument(
        "--log",
        default=str(Path(tempfile.gettempdir()) / "gradunc-soak-server.log"),
        help="file for the server's log (default: gradunc-soak-server.log in the temp folder)",
    )
    parser.add_argument("--json", default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.images < 1:
        parser.error("--minutes, --concurrency and --images must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outcome = soak(args)
    run = outcome["run"]
    print(json.dumps(run, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(outcome, indent=2) + "\n")
    healthy = (
        run["other_errors"] == 0
        and run["wrong_results"] == 0
        and run["ok"] > 0
        and (run["rss_growth_mib"] or 0.0) < args.max_rss_growth_mib
    )
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
