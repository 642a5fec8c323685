"""PostgreSQL goes away under load and comes back: scoring never fails, nothing
acknowledged is lost.

A real service process (``python -m app.main``) records into a PostgreSQL server of the
test's own, while four clients score images and post each answer's feedback. Mid-run the
server is stopped (fast shutdown) and, a while later, started again. Asserted: every
scoring request answered 200; feedback answered 200 or 503 with Retry-After, never
anything else; /readyz said "degraded" during the outage and "ok" after it; the log
named the outage; and afterwards the database holds every served request id and the
label of every feedback item that was acknowledged.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from helpers_store import own_postgres

from app.store.schema import served_scores
from tools.harness import ServerProcess, png_bytes

CLIENTS = 4


def readyz_store(server: ServerProcess) -> dict[str, Any]:
    status, _, body = server.get("/readyz")
    assert status == 200, body  # the bundle is served whatever the store does
    return json.loads(body)["store"]


def wait_store(server: ServerProcess, wanted: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (store := readyz_store(server))["status"] != wanted:
        assert time.monotonic() < deadline, f"the store stayed {store}"
        time.sleep(0.05)
    return store


@pytest.mark.slow
def test_postgresql_stopped_under_load_loses_nothing_acknowledged(
    bundle_dir: Path, tmp_path: Path
) -> None:
    postgres = own_postgres()
    generator = np.random.default_rng(0)
    pngs = [png_bytes(generator.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(16)]
    served: list[str] = []
    acknowledged: dict[str, int] = {}
    score_statuses: list[int] = []
    feedback_statuses: list[tuple[int, str | None, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        url = postgres.create_database("service")
        settings = {"database_url": url, "store_timeout_s": 2, "log_level": "info"}
        with ServerProcess(bundle_dir, tmp_path / "server.log", settings) as server:
            server.wait_ready()
            wait_store(server, "ok")

            def client(seed: int) -> None:
                index = seed
                while not stop.is_set():
                    status, _, body = server.post("/score", pngs[index % 16], "image/png")
                    with lock:
                        score_statuses.append(status)
                    if status != 200:
                        continue
                    request_id = json.loads(body)["request_id"]
                    with lock:
                        served.append(request_id)
                    label = index % 10
                    item = {"items": [{"request_id": request_id, "label": label}]}
                    status, headers, body = server.post(
                        "/feedback", json.dumps(item).encode(), "application/json"
                    )
                    with lock:
                        feedback_statuses.append((status, headers.get("Retry-After"), body[:300]))
                        if status == 200 and json.loads(body)["matched"] == 1:
                            acknowledged[request_id] = label
                    index += CLIENTS

            threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
            for thread in threads:
                thread.start()
            try:
                time.sleep(3)
                postgres.stop()
                degraded = wait_store(server, "degraded")
                time.sleep(3)  # scoring and refused feedback go on meanwhile
                during = readyz_store(server)
                postgres.start()
                wait_store(server, "ok")
                time.sleep(2)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(60)
            deadline = time.monotonic() + 60
            while readyz_store(server)["pending_records"]:
                assert time.monotonic() < deadline, "the buffer never drained"
                time.sleep(0.1)
            log = server.log()

        engine = sa.create_engine(url)
        with engine.connect() as connection:
            stored = dict(
                connection.execute(
                    sa.select(served_scores.c.request_id, served_scores.c.true_label)
                ).all()
            )
        engine.dispose()
    finally:
        postgres.cleanup()

    assert set(score_statuses) == {200}, "scoring failed while the store was away"
    refused = [entry for entry in feedback_statuses if entry[0] != 200]
    assert refused, "no feedback request met the outage"
    for status, retry_after, body in refused:
        assert (status, retry_after) == (503, "1"), body
        assert b"store-unavailable" in body
    assert degraded["error"] and during["status"] == "degraded"
    assert during["pending_records"] > 0  # answers went out while their records waited
    assert "is unreachable" in log and "reachable again" in log
    assert set(served) <= set(stored), f"{len(set(served) - set(stored))} served rows lost"
    lost = {rid for rid, label in acknowledged.items() if stored.get(rid) != label}
    assert not lost, f"{len(lost)} acknowledged feedback items lost"
    assert len(acknowledged) >= 4
