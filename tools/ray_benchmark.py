"""Throughput of the Ray Serve application with one and with two replicas, side by side.

A local Ray cluster (no dashboard, loopback proxy) runs two applications from
:mod:`app.ray_serve` at once: ``/one`` with one replica and ``/two`` with two, each
replica one CPU (as ``serve_config.yaml`` has it). ``clients`` threads then post single
MNIST digits to POST /score for ``seconds``, alternating between the two applications
round by round, so that both see the same machine state; an idle application's replicas
use no CPU while the other is measured.

    python -m tools.ray_benchmark --clients 16 --seconds 20 --rounds 2

Prints images/s of each, the ratio, and the latency percentiles; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tools.harness import free_port, mnist_test_digits, png_bytes

APPLICATIONS = {"one": 1, "two": 2}


def measure(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads posting to ``url``/score for ``seconds``: throughput, latency."""
    latencies: list[float] = []
    errors: list[int] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(timeout=60) as http:
            index = worker
            while time.monotonic() < stop:
                files = {"image": ("d.png", bodies[index % len(bodies)], "image/png")}
                started = time.perf_counter()
                response = http.post(url + "/score", files=files)
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(response.status_code)
                index += clients

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    ms = np.asarray(latencies) * 1000
    return {
        "images": len(latencies),
        "errors": len(errors),
        "images_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
    }


def run(clients: int, seconds: float, rounds: int, cpus: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from app.ray_serve import ScoringReplica

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # No token authentication for this short-lived local cluster: with it, Ray writes a
    # ~/.ray/auth_token that every later cluster on the machine then requires.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("GRADUNC_ENGINE_THREADS", "1")
    os.environ.setdefault("GRADUNC_DECODE_WORKERS", "1")
    port = free_port()
    env = {k: os.environ[k] for k in ("GRADUNC_ENGINE_THREADS", "GRADUNC_DECODE_WORKERS")}
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, replicas in APPLICATIONS.items():
            deployment = ScoringReplica.options(
                num_replicas=replicas, ray_actor_options={"num_cpus": 0.5}
            )
            serve.run(deployment.bind(), name=name, route_prefix=f"/{name}")
        bodies = [png_bytes(image) for image in mnist_test_digits(256)]
        for name in APPLICATIONS:  # warm-up: sessions, first batches
            measure(f"http://127.0.0.1:{port}/{name}", bodies, clients, 3)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in APPLICATIONS}
        for _ in range(rounds):
            for name in APPLICATIONS:
                results[name].append(
                    measure(f"http://127.0.0.1:{port}/{name}", bodies, clients, seconds)
                )
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {
        name: {
            "replicas": APPLICATIONS[name],
            "images_per_s": float(np.mean([r["images_per_s"] for r in rounds_of])),
            "p50_ms": float(np.mean([r["p50_ms"] for r in rounds_of])),
            "p99_ms": float(np.mean([r["p99_ms"] for r in rounds_of])),
            "errors": sum(r["errors"] for r in rounds_of),
            "rounds": rounds_of,
        }
        for name, rounds_of in results.items()
    }
    ratio = summary["two"]["images_per_s"] / summary["one"]["images_per_s"]
    return {
        "clients": clients,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "cpus": cpus,
        "applications": summary,
        "two_over_one": ratio,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ray_benchmark", description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="per round and application")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray's CPUs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(args.clients, args.seconds, args.rounds, args.cpus)
    for figures in result["applications"].values():
        print(
            f"{figures['replicas']} replica(s): {figures['images_per_s']:.1f} images/s, "
            f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
            f"{figures['errors']} errors"
        )
    print(f"two replicas / one: {result['two_over_one']:.2f}x ({args.clients} clients)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
