"""Load: 48 clients against a real server process whose batches hold 16 images.

The server runs in a subprocess on loopback (so its resident memory can be read from
/proc) with a queue of 24 images, so backpressure really happens. The run is bounded by
time and by request count and stops by itself. Asserted: no errors other than 503
backpressure, every 503 is problem+json with Retry-After, every 200 carries the offline
scorer's prediction and probabilities (to 1e-5) for its images, and the server's memory
grew by less than a generous 100 MiB. Speed is printed (and written as JSON to
$GRADUNC_LOAD_REPORT), never asserted. ``python -m tools.soak`` runs the same for minutes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tools.harness import ServerProcess, expected_scores, mnist_test_digits, png_bytes
from tools.soak import run_load

CONCURRENCY = 48
MAX_BATCH_SIZE = 16
QUEUE_MAX = 24
BATCH_IMAGES = 4  # images per /score/batch request (every 4th request)
WARM_UP_S = 4.0
DURATION_S = 20.0
MAX_REQUESTS = 20_000
MAX_RSS_GROWTH_MIB = 100.0


def test_sustained_load_with_backpressure(bundle_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    images = mnist_test_digits(256, data_dir)
    pngs = [png_bytes(image) for image in images]
    expected = expected_scores(bundle_dir, images)
    settings = {
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_images": BATCH_IMAGES,
        "queue_max": QUEUE_MAX,
        "log_level": "warning",
    }
    common = {
        "concurrency": CONCURRENCY,
        "batch_images": BATCH_IMAGES,
        "max_requests": MAX_REQUESTS,
    }
    with ServerProcess(bundle_dir, tmp_path / "server.log", settings) as server:
        server.wait_ready()
        warm_up = run_load(
            server.port, pngs, expected, duration_s=WARM_UP_S, server_pid=server.pid, **common
        )
        report = run_load(
            server.port, pngs, expected, duration_s=DURATION_S, server_pid=server.pid, **common
        )
        exit_code = server.stop()
        log = server.log()

    figures = report.as_dict()
    print("\nload figures:", json.dumps(figures, indent=2))
    if destination := os.environ.get("GRADUNC_LOAD_REPORT"):
        Path(destination).write_text(
            json.dumps(
                {"warm_up": warm_up.as_dict(), "run": figures, "settings": settings}, indent=2
            )
            + "\n"
        )
    for phase in (warm_up, report):
        assert phase.other_errors == 0, phase.examples
        assert phase.wrong_results == 0, phase.examples
    assert report.ok > 0 and report.images_scored >= report.ok
    assert report.requests == report.ok + report.backpressure_503
    assert report.requests <= MAX_REQUESTS
    # 48 clients against a queue of 24 images: backpressure must have happened.
    assert report.backpressure_503 > 0, figures
    assert report.rss_growth_mib is not None and report.rss_growth_mib < MAX_RSS_GROWTH_MIB, figures
    # uvicorn re-raises SIGTERM after its graceful shutdown: -15 is a clean exit too.
    assert exit_code in (0, -signal.SIGTERM), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
