"""The live store against real databases: recording, feedback, retention, faults.

Every test runs on a SQLite file and on a fresh database of a real PostgreSQL server
(``helpers_store``); the fault tests stop and restart a PostgreSQL server of their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from helpers_store import BACKENDS, database_url, own_postgres
from prometheus_client import CollectorRegistry

from app.metrics import LiveMetrics
from app.store import FeedbackItem, LiveStore, StoreState, StoreUnavailable
from app.store.lifespan import new_request_id
from app.store.schema import served_scores


def served(count: int, seed: int = 0, model_version: str = "model-a") -> list[dict[str, Any]]:
    """Score objects as the service returns them (the fields the store keeps)."""
    generator = np.random.default_rng(seed)
    return [
        {
            "request_id": new_request_id(),
            "model_version": model_version,
            "prediction": int(generator.integers(10)),
            "p_correct": float(generator.random()),
            "p_ood": float(generator.random()),
            "is_ood": bool(generator.random() < 0.1),
            "softmax_baseline": float(generator.random()),
            "entropy": float(generator.random() * 2),
            "scores": {"energy": float(generator.normal()), "knn": float(generator.normal())},
            "probabilities": [0.1] * 10,  # not stored
        }
        for _ in range(count)
    ]


def wait_for(condition: Callable[[], bool], timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


def rows(store: LiveStore) -> list[sa.Row]:
    assert store.engine is not None
    with store.engine.connect() as connection:
        return connection.execute(sa.select(served_scores).order_by(served_scores.c.seq)).all()


def metrics_value(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, f"no sample {name}"
    return value


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path):
    url = database_url(request.param, tmp_path)
    stores: list[LiveStore] = []

    def make(**options: Any) -> LiveStore:
        store = LiveStore(url, **options)
        store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.stop()


def test_what_was_served_is_stored_and_feedback_attaches_to_it(make_store) -> None:
    store = make_store()
    results = served(30)
    store.record(results)
    outcome = store.submit_feedback(
        [FeedbackItem(results[0]["request_id"], 7, False)]
        + [FeedbackItem(results[1]["request_id"], None, True)]
        + [FeedbackItem("never-served", 1, False), FeedbackItem("never-served", 2, False)]
    ).result(30)
    assert (outcome.received, outcome.matched, outcome.unknown) == (4, 2, ["never-served"])
    stored = {row.request_id: row for row in rows(store)}
    assert len(stored) == 30
    for result in results:
        row = stored[result["request_id"]]
        for name in ("model_version", "prediction", "p_correct", "p_ood", "is_ood"):
            assert getattr(row, name) == result[name], name
        assert (row.softmax_baseline, row.entropy) == (
            result["softmax_baseline"],
            result["entropy"],
        )
        assert row.scores == result["scores"]
    first, second = stored[results[0]["request_id"]], stored[results[1]["request_id"]]
    assert (first.true_label, first.true_ood) == (7, False)
    assert (second.true_label, second.true_ood) == (None, True)
    assert all(stored[r["request_id"]].labelled_at is None for r in results[2:])


def test_feedback_sent_right_after_the_answer_always_finds_its_row(make_store) -> None:
    store = make_store()
    for index in range(200):
        [result] = served(1, seed=index)
        store.record([result])
        outcome = store.submit_feedback([FeedbackItem(result["request_id"], 1, False)]).result(30)
        assert outcome.matched == 1, f"feedback {index} did not find its row"


def test_repeated_feedback_changes_nothing_and_a_later_one_corrects(make_store) -> None:
    store = make_store()
    [result] = served(1)
    store.record([result])
    item = FeedbackItem(result["request_id"], 4, False)
    store.submit_feedback([item]).result(30)
    [before] = rows(store)
    time.sleep(0.05)
    assert store.submit_feedback([item, item]).result(30).matched == 2
    [repeated] = rows(store)
    assert repeated.labelled_at == before.labelled_at  # an exact repeat is a no-op
    store.submit_feedback([FeedbackItem(result["request_id"], None, True)]).result(30)
    [corrected] = rows(store)
    assert (corrected.true_label, corrected.true_ood) == (None, True)


def test_retention_keeps_the_newest_rows(make_store) -> None:
    store = make_store(max_rows=50, prune_interval_s=0.0)
    results = served(120)
    for start in range(0, 120, 10):
        store.record(results[start : start + 10])
        store.flush(30)
    store.flush(30)  # one more pass: the prune after the last write
    assert [row.request_id for row in rows(store)] == [r["request_id"] for r in results[-50:]]


def test_retention_drops_rows_older_than_the_age_limit(make_store) -> None:
    now = [1_000_000.0]
    store = make_store(max_age_s=50.0, prune_interval_s=0.0, clock=lambda: now[0])
    old, new = served(10, seed=1), served(10, seed=2)
    store.record(old)
    store.flush(30)
    now[0] += 100.0
    store.record(new)
    store.flush(30)
    store.flush(30)
    assert {row.request_id for row in rows(store)} == {r["request_id"] for r in new}


def test_scores_that_are_not_finite_are_stored_as_null(make_store) -> None:
    store = make_store()
    [result] = served(1)
    result["scores"] = {"energy": math.nan, "knn": math.inf, "vim": 1.5}
    store.record([result])
    store.flush(30)
    [row] = rows(store)
    assert row.scores == {"energy": None, "knn": None, "vim": 1.5}


def test_recording_off_stores_nothing_and_refuses_feedback(tmp_path: Path) -> None:
    store = LiveStore(f"sqlite:///{tmp_path / 'never.sqlite3'}", enabled=False)
    store.start()
    store.record(served(3))
    with pytest.raises(StoreUnavailable, match="GRADUNC_STORE_ENABLED=false") as caught:
        store.submit_feedback([FeedbackItem("x", 1, False)])
    assert not caught.value.retryable
    assert store.status()["status"] == "disabled"
    store.stop()
    assert not (tmp_path / "never.sqlite3").exists()


# -- faults --------------------------------------------------------------------------


def test_an_unreachable_store_buffers_counts_what_it_drops_and_refuses_feedback(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    registry = CollectorRegistry()
    metrics = LiveMetrics(registry)
    store = LiveStore(
        f"sqlite:///{blocker / 'live.sqlite3'}", buffer_max=5, timeout_s=1, metrics=metrics
    )
    store.start()
    wait_for(lambda: store.state is StoreState.DEGRADED, what="the store to be degraded")
    store.record(served(8))
    status = store.status()
    assert (status["pending_records"], status["dropped_records"]) == (5, 3)
    assert status["error"]
    with pytest.raises(StoreUnavailable, match="unreachable") as caught:
        store.submit_feedback([FeedbackItem("x", 1, False)])
    assert caught.value.retryable
    assert metrics_value(registry, "gradunc_store_records_dropped_total") == 3
    assert metrics_value(registry, "gradunc_store_write_failures_total") >= 1
    assert metrics_value(registry, "gradunc_store_up") == 0
    store.stop(timeout_s=1)


def test_records_buffered_while_postgresql_is_down_are_written_when_it_is_back(
    tmp_path: Path,
) -> None:
    postgres = own_postgres()
    try:
        url = postgres.create_database("faults")
        store = LiveStore(url, timeout_s=2)
        store.start()
        before = served(20, seed=1)
        store.record(before)
        acknowledged = store.submit_feedback(
            [FeedbackItem(r["request_id"], 2, False) for r in before]
        ).result(30)
        assert acknowledged.matched == 20
        postgres.stop()
        during = served(30, seed=2)
        store.record(during)
        wait_for(lambda: store.state is StoreState.DEGRADED, what="the store to notice")
        with pytest.raises(StoreUnavailable):
            store.submit_feedback([FeedbackItem(during[0]["request_id"], 1, False)])
        assert store.status()["pending_records"] == 30
        postgres.start()
        wait_for(
            lambda: store.state is StoreState.OK and store.status()["pending_records"] == 0,
            what="the buffer to drain",
        )
        stored = {row.request_id: row for row in rows(store)}
        assert set(stored) == {r["request_id"] for r in before + during}
        assert all(stored[r["request_id"]].true_label == 2 for r in before)
        store.stop()
    finally:
        postgres.cleanup()
