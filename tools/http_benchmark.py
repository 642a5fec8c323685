"""Service against engine, side by side in one run: what does the HTTP layer cost?

Starts the service (``python -m app.main``, :class:`tools.harness.ServerProcess`) on a
free loopback port, loads the same bundle in this process as the bare engine
(``UncertaintyScorer``), and measures, one after the other so they never compete for the
cores:

1. throughput of POST /score/batch with 64 images per request vs ``scorer.score`` on
   batches of 64 (target: >= 0.9x, the performance issue's);
2. median latency of POST /score with one image vs ``scorer.score`` on one image
   (target: at most 3 ms more);
3. 16 clients posting single images concurrently vs one client posting them one after
   the other (target: >= 3x the requests per second), which is what dynamic batching buys;
4. the bare scorer with the heads' compiled forms (what the service runs,
   :mod:`scoring.compiled_heads`) vs the same scorer calling scikit-learn's
   ``predict_proba``, interleaved image by image: what the compiled heads save.

Prints a table with the ratios and writes everything as JSON. The clients are plain
``http.client`` connections with pre-encoded bodies, so the client side costs little.

    python -m tools.http_benchmark --bundle-dir models/default --json out/benchmark.json
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.config import DEFAULT_BUNDLE_DIR
from tools.harness import ServerProcess, mnist_test_digits, multipart_body, png_bytes

__all__ = ["main"]

#: The performance issue's target (an earlier one asked for 0.7x).
TARGET_BATCH_RATIO = 0.9
TARGET_LATENCY_OVERHEAD_MS = 3.0
TARGET_CONCURRENCY_RATIO = 3.0


# -- inputs ------------------------------------------------------------------------------


def load_images(count: int, data_dir: str | None) -> tuple[np.ndarray, str]:
    """MNIST test digits when the data set is there, else synthetic strokes; (N, 28, 28)."""
    try:
        return mnist_test_digits(count, data_dir), "MNIST test set"
    except Exception:
        rng = np.random.default_rng(0)
        images = np.zeros((count, 28, 28), dtype=np.uint8)  # (N, 28, 28)
        for image in images:
            column = rng.integers(8, 20)
            image[4:24, column : column + 3] = 255
        return images, "synthetic strokes (MNIST not found)"


# -- talking to the service --------------------------------------------------------------


def connect(service: ServerProcess) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)


def request(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def post_ok(connection: http.client.HTTPConnection, path: str, body: bytes, ctype: str) -> None:
    status, answer = request(connection, "POST", path, body, ctype)
    if status != 200:
        raise RuntimeError(f"POST {path} answered {status}: {answer[:300]!r}")


# -- measurements -----------------------------------------------------------------------


def timed_runs(run: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def concurrent_throughput(
    service: ServerProcess, clients: int, bodies: list[bytes], per_client: int
) -> float:
    """Requests per second of ``clients`` threads, each posting ``per_client`` images."""
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(offset: int) -> None:
        connection = connect(service)
        try:
            barrier.wait()
            for i in range(per_client):
                body = bodies[(offset + i) % len(bodies)]
                post_ok(connection, "/score", body, "image/png")
        except BaseException as error:  # reported after the run
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(k * per_client,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]!r}")
    return clients * per_client / elapsed


def mean_batch_size(service: ServerProcess) -> float | None:
    _, _, text = service.get("/metrics/prometheus")
    total = re.search(rb"^gradunc_batch_size_images_sum ([\d.e+]+)$", text, re.MULTILINE)
    count = re.search(rb"^gradunc_batch_size_images_count ([\d.e+]+)$", text, re.MULTILINE)
    if not total or not count or float(count.group(1)) == 0:
        return None
    return float(total.group(1)) / float(count.group(1))


def measure_engine(
    args: argparse.Namespace, images: np.ndarray, batch: np.ndarray
) -> tuple[float, float, dict[str, str]]:
    """(images/s at ``batch``, median batch-1 latency in ms, providers) of the bare scorer."""
    from scoring.runtime import UncertaintyScorer

    scorer = UncertaintyScorer.from_bundle(
        args.bundle_dir, providers=args.providers, threads=args.threads
    )
    scorer.warm_up()
    scorer.score(batch)
    batch_s = timed_runs(lambda: scorer.score(batch), args.batch_repeats)
    single_s = [
        timed_runs(lambda i=i: scorer.score(images[i : i + 1]), 1)[0] for i in range(args.requests)
    ]
    return (
        len(batch) * len(batch_s) / sum(batch_s),
        statistics.median(single_s) * 1000,
        dict(scorer.providers_in_use),
        measure_heads(scorer, images, batch, args),
    )


def measure_heads(scorer, images: np.ndarray, batch: np.ndarray, args) -> dict[str, Any]:
    """Median ms of ``scorer.score`` with the compiled heads and with scikit-learn's,
    at batch 1 and at ``batch``, the two alternating so load hits both alike."""
    from scoring.runtime import UncertaintyScorer

    plain_heads = dataclasses.replace(scorer.heads, compiled=None)
    plain = UncertaintyScorer(scorer.bundle, scorer.engine, plain_heads, scorer.statistics)
    single: dict[str, list[float]] = {"compiled": [], "scikit_learn": []}
    batched: dict[str, list[float]] = {"compiled": [], "scikit_learn": []}
    for i in range(args.requests):
        for name, runner in (("compiled", scorer), ("scikit_learn", plain)):
            single[name] += timed_runs(lambda r=runner, i=i: r.score(images[i : i + 1]), 1)
            if i < args.batch_repeats:
                batched[name] += timed_runs(lambda r=runner: r.score(batch), 1)
    result: dict[str, Any] = {}
    for label, times in (("batch_1", single), (f"batch_{len(batch)}", batched)):
        compiled, sklearn = (1000 * statistics.median(times[n]) for n in times)
        result[label] = {
            "compiled_ms": compiled,
            "scikit_learn_ms": sklearn,
            "ratio": compiled / sklearn,
        }
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    images, source = load_images(max(args.batch_size * 4, args.requests, 256), args.data_dir)
    pngs = [png_bytes(image) for image in images]
    batch = images[: args.batch_size]  # (64, 28, 28)
    batch_body, batch_type = multipart_body(
        [("images", f"{i}.png", data) for i, data in enumerate(pngs[: args.batch_size])]
    )

    # The bare engine, in this process; released before the service starts.
    engine_batch_ips, engine_single_ms, providers_in_use, heads = measure_engine(
        args, images, batch
    )

    settings: dict[str, object] = {"max_batch_size": args.batch_size, "log_level": "warning"}
    if args.providers:
        settings["providers"] = ",".join(args.providers)
    if args.threads:
        settings["engine_threads"] = args.threads
    with ServerProcess(args.bundle_dir, args.log, settings) as service:
        service.wait_ready(args.start_timeout)
        connection = connect(service)
        for _ in range(3):  # warm the connection and the server's code paths
            post_ok(connection, "/score/batch", batch_body, batch_type)
            post_ok(connection, "/score", pngs[0], "image/png")

        # 1. /score/batch throughput, one client posting 64-image requests back to back.
        service_batch_s = timed_runs(
            lambda: post_ok(connection, "/score/batch", batch_body, batch_type),
            args.batch_repeats,
        )
        service_batch_ips = args.batch_size * len(service_batch_s) / sum(service_batch_s)

        # 2. single-image latency, one client, one request at a time.
        single_s = [
            timed_runs(lambda i=i: post_ok(connection, "/score", pngs[i], "image/png"), 1)[0]
            for i in range(args.requests)
        ]
        service_single_ms = statistics.median(single_s) * 1000
        sequential_rps = len(single_s) / sum(single_s)
        connection.close()

        # 3. concurrent clients posting single images.
        per_client = max(1, args.requests // args.clients)
        concurrent_rps = concurrent_throughput(service, args.clients, pngs, per_client)
        batch_mean = mean_batch_size(service)

    results = {
        "batch_throughput": {
            "service_images_per_s": service_batch_ips,
            "engine_images_per_s": engine_batch_ips,
            "ratio": service_batch_ips / engine_batch_ips,
            "target": f">= {TARGET_BATCH_RATIO}x",
            "met": service_batch_ips / engine_batch_ips >= TARGET_BATCH_RATIO,
        },
        "single_latency": {
            "service_median_ms": service_single_ms,
            "engine_median_ms": engine_single_ms,
            "overhead_ms": service_single_ms - engine_single_ms,
            "target": f"<= engine + {TARGET_LATENCY_OVERHEAD_MS} ms",
            "met": service_single_ms <= engine_single_ms + TARGET_LATENCY_OVERHEAD_MS,
        },
        "concurrency": {
            "concurrent_requests_per_s": concurrent_rps,
            "sequential_requests_per_s": sequential_rps,
            "ratio": concurrent_rps / sequential_rps,
            "clients": args.clients,
            "mean_engine_batch_size": batch_mean,
            "target": f">= {TARGET_CONCURRENCY_RATIO}x",
            "met": concurrent_rps / sequential_rps >= TARGET_CONCURRENCY_RATIO,
        },
    }
    return {
        "bundle_dir": str(args.bundle_dir),
        "images": source,
        "batch_size": args.batch_size,
        "requests": args.requests,
        "providers_in_use": providers_in_use,
        "cpu_count": os.cpu_count(),
        "results": results,
        "compiled_heads": heads,  # measured, no target
    }


def table(report: dict[str, Any]) -> str:
    r = report["results"]
    b, s, c = r["batch_throughput"], r["single_latency"], r["concurrency"]
    rows = [
        ("measure", "service", "reference", "ratio / diff", "target", "met"),
        (
            f"/score/batch @{report['batch_size']}, images/s",
            f"{b['service_images_per_s']:.0f}",
            f"{b['engine_images_per_s']:.0f} (engine)",
            f"{b['ratio']:.2f}x",
            b["target"],
            "yes" if b["met"] else "NO",
        ),
        (
            "/score median latency, ms",
            f"{s['service_median_ms']:.2f}",
            f"{s['engine_median_ms']:.2f} (engine, batch 1)",
            f"{s['overhead_ms']:+.2f} ms",
            s["target"],
            "yes" if s["met"] else "NO",
        ),
        (
            f"{c['clients']} concurrent clients, requests/s",
            f"{c['concurrent_requests_per_s']:.0f}",
            f"{c['sequential_requests_per_s']:.0f} (1 client)",
            f"{c['ratio']:.2f}x",
            c["target"],
            "yes" if c["met"] else "NO",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if c["mean_engine_batch_size"] is not None:
        lines.append(f"mean engine batch size over the run: {c['mean_engine_batch_size']:.1f}")
    for label, h in report["compiled_heads"].items():
        lines.append(
            f"scorer at {label.replace('_', ' ')}: {h['compiled_ms']:.2f} ms with compiled "
            f"heads, {h['scikit_learn_ms']:.2f} ms with scikit-learn's ({h['ratio']:.2f}x)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.http_benchmark",
        description="Benchmark the scoring service over loopback HTTP against the bare engine.",
    )
    parser.add_argument(
        "--bundle-dir", type=Path, default=DEFAULT_BUNDLE_DIR, help="bundle to load"
    )
    parser.add_argument(
        "--data-dir", default=None, help="data directory with mnist/ (default: shared)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch request")
    parser.add_argument("--batch-repeats", type=int, default=30, help="batch requests to time")
    parser.add_argument("--requests", type=int, default=400, help="single-image requests")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument(
        "--providers",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help="onnxruntime execution providers, comma-separated (default: the runtime's)",
    )
    parser.add_argument("--threads", type=int, default=None, help="engine intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--start-timeout", type=float, default=300, help="seconds to wait for /readyz"
    )
    parser.add_argument(
        "--log",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gradunc-benchmark-server.log",
        help="file for the server's log (default: gradunc-benchmark-server.log in the temp folder)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    for name in ("batch_size", "batch_repeats", "requests", "clients"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be at least 1, got {getattr(args, name)}")
    if not (Path(args.bundle_dir) / "manifest.json").is_file():
        parser.error(f"--bundle-dir {args.bundle_dir} has no manifest.json (not a bundle)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    missed = [name for name, result in report["results"].items() if not result["met"]]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
