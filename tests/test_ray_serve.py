"""The service as a Ray Serve application, on a real local Ray cluster on this machine.

The cluster is started by the tests (``ray start --head``: no dashboard, two CPUs, its
own temporary folder) and the application by Ray's own ``serve run`` from the
repository's ``serve_config.yaml``, with only the port, the replica count and a
replica's CPUs changed for the test. Skipped where the ``ray`` extra is not installed.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tools.harness import (
    REPO_ROOT,
    expected_scores,
    free_port,
    mnist_test_digits,
    png_bytes,
    result_mismatch,
)

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed")

pytestmark = pytest.mark.timeout(600)

REPLICAS = 2
#: p_correct and p_ood served against offline: the same graphs and heads, batched
#: differently (the batcher groups concurrent images).
HEAD_TOLERANCE = 1e-5


def _ray_binary(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else shutil.which(name) or name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A one-node Ray cluster with two CPUs, and the application from serve_config.yaml."""
    temp_dir = Path(f"/tmp/gradunc-ray-{os.getpid()}")  # short: Ray's sockets live here
    gcs_port, http_port = free_port(), free_port()
    # Token authentication off for this short-lived test cluster: Ray would otherwise
    # turn it on whenever a ~/.ray/auth_token exists (a local ray.init writes one), and
    # `serve run --address` does not send the token (Ray 2.60).
    ray_auth = {"RAY_AUTH_MODE": "disabled"}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", **ray_auth}
    saved = {name: os.environ.get(name) for name in ray_auth}
    os.environ.update(ray_auth)  # for this process's own ray.init (the driver)
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    deployment = config["applications"][0]["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = REPLICAS
    deployment["ray_actor_options"]["num_cpus"] = 1
    config_path = tmp_path_factory.mktemp("serve") / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = config_path.with_name("serve_run.log")
    address = f"127.0.0.1:{gcs_port}"
    serve_run: subprocess.Popen | None = None
    try:
        subprocess.run(
            [
                _ray_binary("ray"),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs_port}",
                "--num-cpus=2",
                "--num-gpus=0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=180,
        )
        with log_path.open("w") as log:
            serve_run = subprocess.Popen(
                [_ray_binary("serve"), "run", "--address", address, str(config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{http_port}"
        _wait_for_replicas(url, serve_run, log_path)
        ray.init(address=address, namespace="serve", logging_level="ERROR", log_to_driver=False)
        yield {"url": url, "address": address}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if serve_run is not None:
            serve_run.terminate()
            try:
                serve_run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve_run.kill()
        subprocess.run(
            [_ray_binary("ray"), "stop", "--force"], env=env, capture_output=True, timeout=120
        )
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _wait_for_replicas(url: str, serve_run: subprocess.Popen, log: Path) -> None:
    """Until /readyz answers 200 through the proxy (every replica loads in ~10 s)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if serve_run.poll() is not None:
            raise RuntimeError(f"serve run exited ({serve_run.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the application did not become ready:\n{log.read_text()[-5000:]}")


def _replica_names() -> set[str]:
    """Named actors of the deployment's replicas (from the GCS: no dashboard needed),
    counted only while Serve reports that many replicas RUNNING."""
    from ray import serve

    deployment = serve.status().applications["gradunc"].deployments["ScoringReplica"]
    running = deployment.replica_states.get("RUNNING", 0)
    names = {
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["name"].startswith("SERVE_REPLICA::gradunc#ScoringReplica#")
    }
    return names if len(names) == running else set()


def _wait_for_running_replicas(count: int, timeout_s: float = 180) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = _replica_names()
        if len(names) == count:
            return names
        time.sleep(1)
    raise AssertionError(f"not {count} replicas running after {timeout_s} s: {_replica_names()}")


def _assert_same_answers(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected)
    for index, (answer, offline) in enumerate(zip(served, expected, strict=True)):
        assert result_mismatch(answer, offline) is None, (index, result_mismatch(answer, offline))
        for key in ("p_correct", "p_ood"):
            assert abs(answer[key] - offline[key]) <= HEAD_TOLERANCE, (index, key)
        assert answer["is_ood"] == offline["is_ood"], index


@pytest.fixture(scope="module")
def digits(data_dir) -> tuple[np.ndarray, list[dict]]:
    images = mnist_test_digits(48, data_dir)  # data_dir skips, with its reason, without data
    return images, expected_scores(REPO_ROOT / "models" / "default", images)


def test_two_replicas_answer_score_and_batch_exactly_as_the_plain_service(cluster, digits) -> None:
    images, expected = digits
    assert len(_wait_for_running_replicas(REPLICAS)) == REPLICAS
    url = cluster["url"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        singles = list(
            pool.map(
                lambda image: httpx.post(
                    url + "/score", files={"image": ("d.png", png_bytes(image), "image/png")}
                ),
                images[:32],
            )
        )
    assert [r.status_code for r in singles] == [200] * 32
    _assert_same_answers([r.json() for r in singles], expected[:32])

    batch = httpx.post(
        url + "/score/batch",
        files=[
            ("images", (f"{i}.png", png_bytes(image), "image/png"))
            for i, image in enumerate(images[32:])
        ],
        timeout=60,
    )
    assert batch.status_code == 200, batch.text
    _assert_same_answers(batch.json()["results"], expected[32:])


def test_errors_and_readiness_are_the_services_own(cluster) -> None:
    url = cluster["url"]
    wrong = httpx.post(url + "/score", files={"image": ("x.png", b"not an image", "image/png")})
    assert wrong.status_code == 422
    assert wrong.headers["content-type"].startswith("application/problem+json")
    assert "image" in wrong.json()["detail"]
    ready = httpx.get(url + "/readyz").json()
    assert ready["status"] == "ready" and ready["bundle_dir"] == "default"
    # Each replica's own Prometheus registry, through the proxy.
    assert "gradunc_http_requests_total" in httpx.get(url + "/metrics/prometheus").text


def test_a_replica_killed_under_load_is_replaced_and_no_accepted_request_is_lost(
    cluster, digits
) -> None:
    """Four clients (the project's own, ``gradunc_client``) keep scoring while one replica
    is killed: every request gets its right answer. The requests inside the killed
    replica are answered 500 by Ray's proxy, which the client retries; the replacement
    takes traffic only once its bundle has loaded, so nothing is answered "loading"."""
    from gradunc_client import ScoringClient

    images, expected = digits
    url = cluster["url"]
    victim = sorted(_wait_for_running_replicas(REPLICAS))[0]
    stop = time.monotonic() + 20
    answers: list[tuple[int, dict]] = []

    statuses: list[int] = []

    class Recording(httpx.HTTPTransport):
        """Every answer the client receives, retried ones included."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            statuses.append(response.status_code)
            return response

    def client(worker: int) -> None:
        with ScoringClient(url, timeout=60, transport=Recording()) as scoring:
            index = worker
            while time.monotonic() < stop:
                answers.append((index % len(images), scoring.score(images[index % len(images)])))
                index += 4

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, worker) for worker in range(4)]
        time.sleep(4)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        for future in futures:
            future.result()  # a request that was lost raises here

    assert len(answers) > 40
    for index, answer in answers:
        _assert_same_answers([answer], [expected[index]])
    # 500: the proxy's answer for what was inside the killed replica (retried); never a
    # 503 "still loading" from its replacement.
    counts = {code: statuses.count(code) for code in set(statuses)}
    print("answers the clients received while a replica was killed:", counts)
    assert set(statuses) <= {200, 500}, counts
    replaced = _wait_for_running_replicas(REPLICAS)
    assert victim not in replaced
