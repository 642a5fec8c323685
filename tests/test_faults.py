"""Faults: a damaged bundle, an execution provider that cannot start, SIGTERM under load.

Every test runs the real service in a subprocess (``python -m app.main`` on loopback,
:class:`tools.harness.ServerProcess`) so that its log and its exit can be observed:

- a bundle file that is missing, truncated or tampered with keeps the service from ever
  becoming ready: /readyz answers 503 with the reason, the log names the file, and a
  tampered meta-classifier file is never unpickled (its payload would create a file);
- asking for an execution provider this machine cannot start falls back to the CPU, and
  /readyz says so;
- SIGTERM while requests are in flight lets every accepted request finish with a correct
  answer, and refuses new ones cleanly (connection refused, or a 503).
"""

from __future__ import annotations

import http.client
import json
import pickle
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import joblib
import numpy as np
import onnxruntime
import pytest

from tools.harness import (
    ServerProcess,
    as_score_object,
    expected_scores,
    mnist_test_digits,
    multipart_body,
    offline_scores,
    png_bytes,
    result_mismatch,
)

PROBLEM_JSON = "application/problem+json"
BLANK_DIGIT = png_bytes(np.zeros((28, 28), np.uint8))


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the bundle, free to damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def manifest(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


# -- a damaged bundle ----------------------------------------------------------------


class _CreatesFile:
    """Unpickling this opens ``path`` for writing, i.e. creates it: arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"p_correct": [_CreatesFile(marker)], "p_ood": []})


def test_the_malicious_payload_would_run_if_loaded(tmp_path: Path) -> None:
    """The control for the tampering test: joblib.load really runs the payload."""
    marker = tmp_path / "control-marker"
    (tmp_path / "heads.joblib").write_bytes(malicious_pickle(marker))
    loaded = joblib.load(tmp_path / "heads.joblib")
    loaded["p_correct"][0].close()  # the file object the payload opened
    assert marker.exists()


def _damage(bundle_dir: Path, fault: str, marker: Path) -> str:
    """Damage one file of the bundle; return its path relative to the bundle."""
    graph = manifest(bundle_dir)["graphs"][0]
    if fault == "missing":
        (bundle_dir / graph).unlink()
        return graph
    if fault == "truncated":
        data = (bundle_dir / graph).read_bytes()
        (bundle_dir / graph).write_bytes(data[: len(data) // 2])
        return graph
    heads = manifest(bundle_dir)["heads"]
    (bundle_dir / heads).write_bytes(malicious_pickle(marker))
    return heads


@pytest.mark.parametrize("fault", ["missing", "truncated", "tampered"])
def test_a_damaged_bundle_keeps_the_service_from_becoming_ready(
    bundle_copy: Path, tmp_path: Path, fault: str
) -> None:
    marker = tmp_path / "payload-ran"
    damaged = _damage(bundle_copy, fault, marker)
    server = ServerProcess(bundle_copy, tmp_path / "server.log", {"log_level": "info"})
    with server:
        status, body = server.wait_settled()
        assert status == 503, body
        assert body["state"] == "failed"
        assert damaged in body["detail"], body["detail"]
        assert str(bundle_copy) not in body["detail"]  # no absolute path in an answer
        reason = {"missing": "missing", "truncated": "SHA-256", "tampered": "SHA-256"}[fault]
        assert reason in body["detail"], body["detail"]
        # The service stays up, alive but not ready, and refuses to score.
        assert server.get("/healthz")[0] == 200
        status, headers, data = server.post("/score", BLANK_DIGIT, "image/png")
        assert status == 503
        assert headers.get("Content-Type", "").startswith(PROBLEM_JSON)
        assert damaged in json.loads(data)["detail"]
    log = server.log()
    failure_lines = [line for line in log.splitlines() if "failed" in line and damaged in line]
    assert failure_lines, f"no log line names {damaged}:\n{log[-3000:]}"
    assert any(line.startswith("ERROR") for line in failure_lines), failure_lines
    assert not marker.exists(), "the tampered joblib file was unpickled"


# -- an execution provider that cannot start -----------------------------------------


def _provider_that_cannot_run_here() -> str:
    """CUDA on a machine without it; else another provider onnxruntime knows but lacks."""
    missing = set(onnxruntime.get_all_providers()) - set(onnxruntime.get_available_providers())
    for name in ("CUDAExecutionProvider", "TensorrtExecutionProvider", *sorted(missing)):
        if name in missing:
            return name
    pytest.fail("this onnxruntime build has every provider it knows; none can be missing")


def test_an_unavailable_provider_falls_back_to_cpu_and_readyz_says_so(
    bundle_dir: Path, tmp_path: Path
) -> None:
    wanted = _provider_that_cannot_run_here()
    settings = {"providers": f"{wanted},CPUExecutionProvider", "log_level": "info"}
    with ServerProcess(bundle_dir, tmp_path / "server.log", settings) as server:
        ready = server.wait_ready()
        graphs = [Path(path).name for path in manifest(bundle_dir)["graphs"]]
        assert ready["providers"] == dict.fromkeys(graphs, "CPUExecutionProvider")
        assert ready["requested_providers"] == [wanted, "CPUExecutionProvider"]
        assert ready["unavailable_providers"] == [wanted]
        assert wanted in ready["provider_fallback"]
        assert "CPUExecutionProvider" in ready["provider_fallback"]
        # And it scores.
        assert server.post("/score", BLANK_DIGIT, "image/png")[0] == 200
    assert re.search(rf"WARNING.*{wanted}.*unavailable", server.log()), server.log()[-3000:]


# -- SIGTERM under load ---------------------------------------------------------------

IN_FLIGHT_REQUESTS = 10
#: Enough for the requests to be in flight when SIGTERM lands, few enough that scoring
#: them stays well inside the 30 s graceful shutdown on a loaded 2-core machine (2,000
#: images once took longer there; what is then cut off gets a 503, tests/test_shutdown.py).
IMAGES_PER_REQUEST = 60


def _queue_depth(server: ServerProcess) -> float:
    _, _, body = server.get("/metrics/prometheus")
    match = re.search(rb"^gradunc_queue_depth_images (\S+)$", body, re.MULTILINE)
    assert match is not None, body[:2000]
    return float(match.group(1))


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(
    bundle_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    images = mnist_test_digits(IMAGES_PER_REQUEST, data_dir)
    expected = expected_scores(bundle_dir, images)
    body, content_type = multipart_body(
        [("images", f"{i}.png", png_bytes(image)) for i, image in enumerate(images)]
    )
    single = png_bytes(images[0])
    settings = {"max_batch_size": 16, "queue_max": 4096, "log_level": "info"}
    server = ServerProcess(bundle_dir, tmp_path / "server.log", settings).start()
    try:
        server.wait_ready()
        sent = threading.Barrier(IN_FLIGHT_REQUESTS + 1, timeout=60)
        outcomes: list[object] = [None] * IN_FLIGHT_REQUESTS

        def client(slot: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
            try:
                connection.request(
                    "POST", "/score/batch", body=body, headers={"Content-Type": content_type}
                )
                sent.wait()
                response = connection.getresponse()
                outcomes[slot] = (response.status, response.read())
            except Exception as error:  # recorded, judged below
                outcomes[slot] = error
            finally:
                connection.close()

        clients = [
            threading.Thread(target=client, args=(slot,)) for slot in range(IN_FLIGHT_REQUESTS)
        ]
        for thread in clients:
            thread.start()
        sent.wait()
        # Requests on connections opened after the others are served after those were
        # read, so once /healthz answers every request above has reached the app; wait
        # until they are admitted to the queue, then stop the server under their feet.
        assert server.get("/healthz")[0] == 200
        deadline = time.monotonic() + 60
        while _queue_depth(server) < IMAGES_PER_REQUEST and time.monotonic() < deadline:
            time.sleep(0.02)
        answered_before = sum(outcome is not None for outcome in outcomes)
        server.process.send_signal(signal.SIGTERM)

        # uvicorn notices the signal on its next tick (every 0.1 s): until then a new
        # request is still accepted and must be answered in full; after it, refused.
        late: list[str] = []
        while server.process.poll() is None and len(late) < 1000:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                connection.request(
                    "POST", "/score", body=single, headers={"Content-Type": "image/png"}
                )
                response = connection.getresponse()
                data = response.read()  # IncompleteRead if truncated: fails the test
                connection.close()
                if response.status == 200:
                    assert result_mismatch(json.loads(data), expected[0]) is None
                    late.append("200")
                else:
                    assert response.status == 503, (response.status, data[:300])
                    assert response.getheader("Content-Type", "").startswith(PROBLEM_JSON)
                    late.append("503")
            except (ConnectionRefusedError, ConnectionResetError) as error:
                late.append(type(error).__name__)
            except http.client.RemoteDisconnected as error:  # closed before any byte
                late.append(type(error).__name__)
            time.sleep(0.05)
        exit_code = server.process.wait(timeout=120)
        for thread in clients:
            thread.join(timeout=120)
    finally:
        server.stop()
    log = server.log()

    assert answered_before < IN_FLIGHT_REQUESTS, "no request was in flight at SIGTERM"
    for slot, outcome in enumerate(outcomes):
        assert isinstance(outcome, tuple), f"request {slot}: {outcome!r}"
        status, data = outcome
        assert status == 200, (slot, status, data[:300])
        results = json.loads(data)["results"]
        assert len(results) == IMAGES_PER_REQUEST
        for index, result in enumerate(results):
            assert result_mismatch(result, expected[index]) is None, (slot, index)
    refusals = [i for i, outcome in enumerate(late) if outcome != "200"]
    assert refusals, f"no new request was refused while the server shut down: {late}"
    assert "200" not in late[refusals[0] :], f"a request was served after a refusal: {late}"
    print(
        f"\nSIGTERM: {IN_FLIGHT_REQUESTS - answered_before} of {IN_FLIGHT_REQUESTS} requests "
        f"({IMAGES_PER_REQUEST} images each) in flight, all answered 200 and correct; "
        f"new requests after it: {late.count('200')} served before uvicorn's next tick, "
        f"{len(refusals)} refused ({', '.join(sorted(set(late) - {'200'}))})"
    )
    assert exit_code in (0, -signal.SIGTERM), log[-3000:]
    assert "Waiting for connections to close" in log or "Waiting for background" in log, log
    assert "Application shutdown complete" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_closing_the_batcher_drains_admitted_requests_with_the_real_scorer(
    bundle_dir: Path, data_dir: Path
) -> None:
    """What the lifespan does on shutdown: queued work is scored, not dropped; new work
    is refused with a 503."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from app.batching import DynamicBatcher
    from app.errors import NotReady
    from scoring.runtime import UncertaintyScorer

    images = mnist_test_digits(96, data_dir)
    scorer = UncertaintyScorer.from_bundle(bundle_dir)
    expected = offline_scores(scorer, images)

    async def scenario() -> tuple[list, BaseException | None]:
        executor = ThreadPoolExecutor(1)
        batcher = DynamicBatcher(
            scorer.score, executor, max_batch_size=8, max_wait_s=0.002, queue_max=1000
        )
        batcher.start()

        async def one(chunk: np.ndarray) -> list:
            async with batcher.admit(len(chunk)) as admission:
                await asyncio.sleep(0.01)  # still "decoding" when the close begins
                return await admission.score(chunk, False)

        requests = [asyncio.ensure_future(one(images[i : i + 12])) for i in range(0, 96, 12)]
        await asyncio.sleep(0)  # every request admitted, none scored yet
        assert batcher.depth == 96
        await batcher.close(drain_timeout_s=60)
        refused = None
        try:
            batcher.admit(1)
        except NotReady as error:
            refused = error
        results = await asyncio.gather(*requests, return_exceptions=True)
        executor.shutdown()
        return results, refused

    results, refused = asyncio.run(scenario())
    failed = [chunk for chunk in results if isinstance(chunk, BaseException)]
    assert not failed, failed
    served = [result for chunk in results for result in chunk]
    assert len(served) == 96
    for result, offline in zip(served, expected, strict=True):
        assert result_mismatch(as_score_object(result), offline) is None
    assert isinstance(refused, NotReady) and "shutting down" in str(refused)
