"""The live store: records what was served, applies feedback, keeps retention, off the loop.

The event loop only appends to an in-memory buffer (:meth:`LiveStore.record`, a few
microseconds per image); one writer thread empties it into the database in batches of up
to :data:`CHUNK_ROWS` rows per transaction. Feedback (:meth:`LiveStore.submit_feedback`)
goes through the same thread, after every record buffered before it, so feedback sent
right after its answer always finds the row. The same thread prunes by age and by row
count.

When the database cannot be reached, scoring goes on: records wait in the buffer (at most
``buffer_max``; beyond it they are dropped, counted and logged), the writer retries with
a growing pause, the store reports itself degraded (GET /readyz), and feedback is refused
(503 with Retry-After) rather than acknowledged and lost. A feedback item is acknowledged
only after its transaction committed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app.store.database import create_store_engine, display_url, parse_database_url, upgrade
from app.store.schema import served_scores

if TYPE_CHECKING:
    from app.metrics import LiveMetrics

__all__ = [
    "CHUNK_ROWS",
    "TRANSIENT_ERRORS",
    "FeedbackItem",
    "FeedbackOutcome",
    "LiveStore",
    "StoreState",
    "StoreUnavailable",
]

logger = logging.getLogger(__name__)

#: Rows per INSERT transaction and ids per IN (...) query.
CHUNK_ROWS = 1000
#: Pause after a failed attempt, doubling up to the maximum, in seconds.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
#: Dropped records are logged at most this often (with the count since the last line).
DROP_LOG_INTERVAL_S = 10.0

#: Errors that mean "the database is not reachable right now": retried, never dropped.
TRANSIENT_ERRORS = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    OSError,
)


class StoreState(StrEnum):
    STARTING = "starting"  # the schema has not been brought up to date yet
    OK = "ok"
    DEGRADED = "degraded"  # the last attempt failed; records wait, feedback is refused
    DISABLED = "disabled"  # recording is off (GRADUNC_STORE_ENABLED=false)
    STOPPED = "stopped"


class StoreUnavailable(Exception):
    """The store cannot take feedback now; ``retryable`` says whether retrying may help."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class FeedbackItem:
    """Ground truth for one request id: a class index, or ``ood`` (none of the classes)."""

    request_id: str
    label: int | None
    ood: bool


@dataclass(frozen=True)
class FeedbackOutcome:
    received: int
    matched: int
    unknown: list[str]


@dataclass
class _FeedbackJob:
    items: Sequence[FeedbackItem]
    future: Future[FeedbackOutcome] = field(default_factory=Future)


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _json_safe_scores(scores: Mapping[str, Any] | None) -> dict[str, float | None] | None:
    """``scores`` with NaN and infinities as null: JSON (and PostgreSQL's json) has none."""
    if not scores:
        return None
    return {
        name: float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        for name, value in scores.items()
    }


def _insert_ignoring_duplicates(dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: a batch retried after a commit whose
    acknowledgement was lost must not fail on the rows it already wrote."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(served_scores).on_conflict_do_nothing(
            index_elements=["request_id"]
        )
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(served_scores).on_conflict_do_nothing(index_elements=["request_id"])


_UPDATE_FEEDBACK = (
    served_scores.update()
    .where(served_scores.c.request_id == sa.bindparam("b_request_id"))
    # An exact repeat changes nothing, not even labelled_at: duplicates are idempotent.
    .where(
        sa.or_(
            served_scores.c.true_label.is_distinct_from(sa.bindparam("b_label")),
            served_scores.c.true_ood.is_distinct_from(sa.bindparam("b_ood")),
        )
    )
    .values(
        true_label=sa.bindparam("b_label"),
        true_ood=sa.bindparam("b_ood"),
        labelled_at=sa.bindparam("b_at"),
    )
)


class LiveStore:
    """The state store of one app: a buffer, a writer thread and a database engine."""

    def __init__(
        self,
        database_url: str,
        *,
        enabled: bool = True,
        max_rows: int = 1_000_000,
        max_age_s: float = 30 * 86400,
        buffer_max: int = 100_000,
        flush_s: float = 0.05,
        timeout_s: float = 5.0,
        prune_interval_s: float = 60.0,
        metrics: LiveMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = parse_database_url(database_url)
        self.backend = self.url.get_backend_name()
        self.enabled = enabled
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.buffer_max = buffer_max
        self.flush_s = flush_s
        self.timeout_s = timeout_s
        self.prune_interval_s = prune_interval_s
        self.metrics = metrics
        self.clock = clock
        self.state = StoreState.STARTING if enabled else StoreState.DISABLED
        self.error: str | None = None
        self.engine: Engine | None = None
        self._records: deque[dict[str, Any]] = deque()
        self._jobs: deque[_FeedbackJob] = deque()
        self._pending = 0  # buffered or being written
        self._dropped = 0
        self._dropped_unlogged = 0
        self._last_drop_log = 0.0
        self._written = 0
        self._labelled = 0  # feedback items committed
        self._condition = threading.Condition()
        self._stopping = False
        self._migrated = False
        self._next_prune = 0.0
        self._retry_s = RETRY_MIN_S
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.store_pending.set_function(lambda: self._pending)
            metrics.store_up.set_function(lambda: 1.0 if self.state is StoreState.OK else 0.0)

    @classmethod
    def from_settings(cls, settings: Any, metrics: LiveMetrics | None = None) -> LiveStore:
        """The store ``app.config.Settings`` describe (GRADUNC_DATABASE_URL, GRADUNC_STORE_*)."""
        return cls(
            settings.database_url,
            enabled=settings.store_enabled,
            max_rows=settings.store_max_rows,
            max_age_s=settings.store_max_age_s,
            buffer_max=settings.store_buffer_max,
            timeout_s=settings.store_timeout_s,
            metrics=metrics,
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread; it connects and migrates in the background."""
        if not self.enabled:
            logger.info("recording served answers is off (GRADUNC_STORE_ENABLED=false)")
            return
        self.engine = create_store_engine(
            self.url.render_as_string(hide_password=False), self.timeout_s
        )
        self._thread = threading.Thread(target=self._run, name="gradunc-store", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is buffered (for at most ``timeout_s``), then close the engine."""
        with self._condition:
            self._stopping = True
            self._stop_deadline = time.monotonic() + timeout_s
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s + 1.0)
        if self._pending:
            logger.warning(
                "the live store at %s was stopped with %d served records not written",
                display_url(self.url),
                self._pending,
            )
        if self.engine is not None:
            self.engine.dispose()
        if self.enabled:
            self.state = StoreState.STOPPED

    # -- what the event loop calls ---------------------------------------------------

    def record(self, results: Sequence[Mapping[str, Any]]) -> None:
        """Buffer what was served for each result (they carry ``request_id``); never blocks
        on the database and never raises for it."""
        if not self.enabled:
            return
        served_at = self.clock()
        rows = [
            {
                "request_id": result["request_id"],
                "served_at": served_at,
                "model_version": result["model_version"],
                "prediction": result["prediction"],
                "p_correct": result["p_correct"],
                "p_ood": result["p_ood"],
                "is_ood": result["is_ood"],
                "softmax_baseline": result["softmax_baseline"],
                "entropy": result["entropy"],
                "scores": _json_safe_scores(result.get("scores")),
            }
            for result in results
        ]
        with self._condition:
            room = 0 if self._stopping else max(self.buffer_max - self._pending, 0)
            kept = rows[:room]
            self._records.extend(kept)
            self._pending += len(kept)
            self._condition.notify()
        if len(kept) < len(rows):
            self._count_dropped(len(rows) - len(kept), "the in-memory buffer is full")

    def submit_feedback(self, items: Sequence[FeedbackItem]) -> Future[FeedbackOutcome]:
        """Queue ``items`` behind every record buffered so far; the future completes once
        they are committed (or fails with :class:`StoreUnavailable`)."""
        self.check_available()
        job = _FeedbackJob(items)
        with self._condition:
            if self._stopping:
                raise StoreUnavailable("the service is shutting down")
            self._jobs.append(job)
            self._condition.notify()
        return job.future

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every record buffered before the call is written (or raise
        :class:`StoreUnavailable`, or ``TimeoutError`` after ``timeout_s``)."""
        self.submit_feedback([]).result(timeout_s)

    def check_available(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store takes feedback now. While it is
        starting, feedback is taken: it waits for the schema like the records do."""
        if self.state is StoreState.DISABLED:
            raise StoreUnavailable(
                "recording served answers is off (GRADUNC_STORE_ENABLED=false), so there is "
                "nothing to attach feedback to",
                retryable=False,
            )
        if self.state is StoreState.STOPPED or self._stopping:
            raise StoreUnavailable("the service is shutting down")
        if self.state is StoreState.DEGRADED:
            raise StoreUnavailable(
                f"the live store ({self.backend}) is unreachable: {self.error}; "
                "feedback is not accepted until it is back"
            )

    @property
    def changes(self) -> int:
        """Rows written plus feedback items committed by this process so far."""
        return self._written + self._labelled

    def status(self) -> dict[str, Any]:
        """What GET /readyz says about the store."""
        return {
            "status": self.state.value,
            "backend": self.backend,
            "pending_records": self._pending,
            "dropped_records": self._dropped,
            "error": self.error if self.state is StoreState.DEGRADED else None,
        }

    # -- the writer thread -----------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._records or self._jobs or self._stopping)

    def _run(self) -> None:
        while True:
            with self._condition:
                if not self._has_work():
                    self._condition.wait_for(self._has_work, timeout=self._idle_wait())
                if self._records and not self._jobs and not self._stopping:
                    # Let a few more records arrive, so that one transaction takes many;
                    # feedback does not wait for this.
                    self._condition.wait_for(
                        lambda: self._jobs or self._stopping or len(self._records) >= CHUNK_ROWS,
                        timeout=self.flush_s,
                    )
                records = list(self._records)
                self._records.clear()
                jobs = list(self._jobs)
                self._jobs.clear()
                stopping = self._stopping
            succeeded = self._attempt(records, jobs)
            if stopping:
                with self._condition:
                    done = not self._records and not self._jobs
                if done or time.monotonic() > self._stop_deadline:
                    self._fail_jobs(list(self._jobs), "the service is shutting down")
                    return
            if not succeeded:
                with self._condition:
                    self._condition.wait_for(lambda: self._stopping, timeout=self._retry_s)
                self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)

    def _idle_wait(self) -> float:
        if self.state is not StoreState.OK:
            return self._retry_s  # retry the connection even with nothing to write
        return max(self._next_prune - time.monotonic(), 0.01)

    def _attempt(self, records: list[dict[str, Any]], jobs: list[_FeedbackJob]) -> bool:
        """Write ``records``, apply ``jobs``, prune when due; False if the store failed."""
        assert self.engine is not None
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        written = 0
        try:
            if not self._migrated:
                upgrade(self.engine)
                self._migrated = True
            insert = _insert_ignoring_duplicates(self.engine.dialect.name)
            for chunk in _chunks(records, CHUNK_ROWS):
                written += self._insert(insert, chunk)
            if jobs:
                self._apply_feedback(jobs)
            if not records and not jobs and self.state is not StoreState.OK:
                with self.engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
            if time.monotonic() >= self._next_prune:
                self._prune()
        except TRANSIENT_ERRORS as error:
            self._put_back(records[written:])
            self._fail_jobs(jobs, None)
            self._mark_degraded(error)
            return False
        except Exception as error:
            # Not a connection problem: retrying the same rows would fail forever.
            logger.exception("the live store rejected a write; its rows are dropped")
            self._release(len(records) - written)
            self._count_dropped(len(records) - written, f"the database rejected them: {error}")
            self._fail_jobs(jobs, None, error)
            return True
        self._mark_ok()
        return True

    def _insert(self, insert: Any, chunk: Sequence[dict[str, Any]]) -> int:
        assert self.engine is not None
        with self.engine.begin() as connection:
            connection.execute(insert, list(chunk))
        self._release(len(chunk))
        self._written += len(chunk)
        if self.metrics is not None:
            self.metrics.store_written.inc(len(chunk))
        return len(chunk)

    def _apply_feedback(self, jobs: list[_FeedbackJob]) -> None:
        assert self.engine is not None
        now = self.clock()
        ids = list(dict.fromkeys(item.request_id for job in jobs for item in job.items))
        with self.engine.begin() as connection:
            known: set[str] = set()
            for chunk in _chunks(ids, CHUNK_ROWS):
                query = sa.select(served_scores.c.request_id).where(
                    served_scores.c.request_id.in_(chunk)
                )
                known.update(connection.execute(query).scalars())
            latest: dict[str, FeedbackItem] = {}
            for job in jobs:  # in the order they arrived: a later answer corrects an earlier
                for item in job.items:
                    if item.request_id in known:
                        latest[item.request_id] = item
            if latest:
                connection.execute(
                    _UPDATE_FEEDBACK,
                    [
                        {
                            "b_request_id": item.request_id,
                            "b_label": item.label,
                            "b_ood": item.ood,
                            "b_at": now,
                        }
                        for item in latest.values()
                    ],
                )
        for job in jobs:
            unknown = list(
                dict.fromkeys(item.request_id for item in job.items if item.request_id not in known)
            )
            matched = sum(item.request_id in known for item in job.items)
            if self.metrics is not None:
                self.metrics.feedback_items.labels("matched").inc(matched)
                self.metrics.feedback_items.labels("unknown").inc(len(job.items) - matched)
            self._labelled += matched
            job.future.set_result(FeedbackOutcome(len(job.items), matched, unknown))

    def _prune(self) -> None:
        """Delete rows older than ``max_age_s``, then all but the newest ``max_rows``."""
        assert self.engine is not None
        self._next_prune = time.monotonic() + self.prune_interval_s
        with self.engine.begin() as connection:
            old = connection.execute(
                served_scores.delete().where(
                    served_scores.c.served_at < self.clock() - self.max_age_s
                )
            ).rowcount
            boundary = connection.execute(
                sa.select(served_scores.c.seq)
                .order_by(served_scores.c.seq.desc())
                .offset(self.max_rows)
                .limit(1)
            ).scalar_one_or_none()
            excess = 0
            if boundary is not None:
                excess = connection.execute(
                    served_scores.delete().where(served_scores.c.seq <= boundary)
                ).rowcount
        if old or excess:
            logger.info(
                "live store retention: deleted %d rows older than %g s and %d beyond %d rows",
                old,
                self.max_age_s,
                excess,
                self.max_rows,
            )

    # -- bookkeeping -------------------------------------------------------------------

    def _put_back(self, records: list[dict[str, Any]]) -> None:
        with self._condition:
            self._records.extendleft(reversed(records))

    def _release(self, count: int) -> None:
        with self._condition:
            self._pending -= count

    def _fail_jobs(
        self, jobs: list[_FeedbackJob], reason: str | None, error: Exception | None = None
    ) -> None:
        for job in jobs:
            if job.future.done():
                continue
            if job.future.running() or job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    error or StoreUnavailable(reason or f"the live store failed: {self.error}")
                )

    def _mark_degraded(self, error: BaseException) -> None:
        # An OSError's text names the file: GET /readyz carries no paths, so only its reason.
        text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        message = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
        if self.metrics is not None:
            self.metrics.store_failures.inc()
        if self.state is not StoreState.DEGRADED:
            logger.error(
                "the live store at %s is unreachable (%s); scoring goes on, served records "
                "wait in memory (%d now, at most %d) and feedback is refused until it is back",
                display_url(self.url),
                message,
                self._pending,
                self.buffer_max,
            )
        self.error = message
        self.state = StoreState.DEGRADED

    def _mark_ok(self) -> None:
        if self.state is StoreState.DEGRADED:
            logger.warning(
                "the live store at %s is reachable again (%d records still buffered)",
                display_url(self.url),
                self._pending,
            )
        elif self.state is StoreState.STARTING:
            logger.info("live store ready at %s", display_url(self.url))
        self.state = StoreState.OK
        self.error = None
        self._retry_s = RETRY_MIN_S

    def _count_dropped(self, count: int, why: str) -> None:
        with self._condition:
            self._dropped += count
            self._dropped_unlogged += count
            now = time.monotonic()
            due = now - self._last_drop_log >= DROP_LOG_INTERVAL_S
            if due:
                unlogged, self._dropped_unlogged = self._dropped_unlogged, 0
                self._last_drop_log = now
        if self.metrics is not None:
            self.metrics.store_dropped.inc(count)
        if due:
            logger.warning(
                "%d served records were not recorded in the live store (%s); %d in all",
                unlogged,
                why,
                self._dropped,
            )
