"""Dynamic batching: concurrent requests gathered into one engine call.

Requests are *admitted* first (:meth:`DynamicBatcher.admit`), which reserves room in a
bounded queue before any work is spent on them; a full queue raises :class:`QueueFull`
(503 with Retry-After: the time the queue needs to drain enough for this request, at the
rate the engine has been scoring).

Fair admission. A request is admitted or refused as a whole, by its image count. Without
a rule, single images would take every slot a finished request frees, one at a time, and
a batch, which needs many at once, would almost never get in. So requests are of two
kinds, single images and batches (two or more images), and **while both kinds contend,
neither may hold more than half of ``queue_max`` images**; a kind contends while it has
images admitted or had a request refused within the last ``CONTENTION_WINDOW_S``. A kind
alone may use the whole queue, and a kind holding nothing is admitted whenever the queue
has room, so a batch larger than half the queue still gets in. Under saturation both
kinds then have about half the queue each, and so about the same images per second.

An admitted request decodes its images, then submits them. One
collector task forms batches from the submitted jobs, in arrival order, of at most
``max_batch_size`` images, and runs each in the engine's worker thread, so the event loop
never blocks on inference. While the engine works, new jobs accumulate and form the next
batch: under load batches grow by themselves.

A partial batch is held open for at most ``max_wait_s``, and only while other admitted
requests are still on their way (being received or decoded): a lone client never waits.
A request larger than ``max_batch_size`` is split into several jobs; results are
reassembled in order. An engine error fails the requests of that batch only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from app.errors import NotReady, QueueFull, ServiceError
from app.metrics import ServiceMetrics

if TYPE_CHECKING:  # the runtime imports onnxruntime; the batcher only passes answers on
    from scoring.runtime import ImageScore

__all__ = ["CONTENTION_WINDOW_S", "Admission", "DynamicBatcher", "EngineFailed", "ScoreFunction"]

logger = logging.getLogger(__name__)

#: ``score(images uint8 (B, 28, 28), include_members) -> one result dict per image``.
ScoreFunction = Callable[[np.ndarray, bool], "list[ImageScore]"]

#: How long a refused request keeps its kind (single or batch) contending for its share
#: of the queue, in seconds: about as long as its client waits before retrying.
CONTENTION_WINDOW_S = 2.0
#: Longest Retry-After the queue estimate gives, in seconds.
MAX_RETRY_AFTER_S = 60
#: Weight of the newest batch in the engine-rate average behind Retry-After.
_RATE_SMOOTHING = 0.2


def request_kind(n_images: int) -> str:
    """The admission kind of a request: "single" (one image) or "batch"."""
    return "single" if n_images == 1 else "batch"


class EngineFailed(ServiceError):
    """The engine raised while scoring the batch a request was part of."""

    status_code = 500
    problem = "engine-failed"


@dataclass
class _Job:
    images: np.ndarray  # (n, 28, 28) uint8, n <= max_batch_size
    include_members: bool
    future: asyncio.Future[list[ImageScore]] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.images)


class DynamicBatcher:
    """Gathers submitted images into batches for one engine running in ``executor``."""

    def __init__(
        self,
        score: ScoreFunction,
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_max: int,
        retry_after_s: int = 1,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size!r}")
        if queue_max < 1:
            raise ValueError(f"queue_max must be at least 1, got {queue_max!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s!r}")
        self._score = score
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_max = queue_max
        self.retry_after_s = retry_after_s
        self._metrics = metrics
        self._pending: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._admitted_images = 0  # admitted and not yet answered
        self._admitted_by_kind = {"single": 0, "batch": 0}
        self._refused_at = {"single": -math.inf, "batch": -math.inf}  # loop time
        self._images_per_s: float | None = None  # engine rate, smoothed (Retry-After)
        self._incoming = 0  # admitted requests that have not submitted yet
        self._idle = asyncio.Event()  # set while no image is admitted
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- admission ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Images admitted and not yet answered."""
        return self._admitted_images

    def admit(self, n_images: int) -> Admission:
        """Reserve room for ``n_images``; raise :class:`QueueFull` when there is none.

        The fair-share rule of the module docstring decides; the refusal's Retry-After
        is the estimated time until the room this request needs has drained.
        """
        if self._closed:
            raise NotReady("the service is shutting down", retry_after_s=self.retry_after_s)
        if n_images < 1:
            raise ValueError(f"n_images must be at least 1, got {n_images!r}")
        kind = request_kind(n_images)
        other = "batch" if kind == "single" else "single"
        now = time.monotonic()
        held = self._admitted_by_kind[kind]
        share = self.queue_max // 2
        other_contends = (
            self._admitted_by_kind[other] > 0 or now - self._refused_at[other] < CONTENTION_WINDOW_S
        )
        if self._admitted_images + n_images > self.queue_max:
            over = self._admitted_images + n_images - self.queue_max
            reason = (
                f"the scoring queue is full: {self._admitted_images} images waiting, "
                f"{n_images} more would exceed the limit of {self.queue_max} (GRADUNC_QUEUE_MAX)"
            )
        elif other_contends and held > 0 and held + n_images > share:
            over = held + n_images - share
            reason = (
                f"the scoring queue's share for {kind} requests is taken: {held} of their "
                f"images waiting, {n_images} more would exceed half the queue ({share} of "
                f"GRADUNC_QUEUE_MAX={self.queue_max}) while {other} requests wait too"
            )
        else:
            over = 0
        if over > 0:
            self._refused_at[kind] = now
            if self._metrics is not None:
                self._metrics.rejected.inc()
            retry_after_s = self._retry_after(over)
            raise QueueFull(
                f"{reason}; retry in {retry_after_s} s",
                retry_after_s=retry_after_s,
                extra={"limit": "GRADUNC_QUEUE_MAX", "limit_value": self.queue_max},
            )
        self._admitted_images += n_images
        self._admitted_by_kind[kind] += n_images
        self._incoming += 1
        self._idle.clear()
        self._set_depth()
        return Admission(self, n_images)

    def _retry_after(self, images_to_drain: int) -> int:
        """Whole seconds until ``images_to_drain`` images have been scored, at the engine's
        recent rate; at least ``retry_after_s``."""
        if not self._images_per_s:
            return self.retry_after_s
        seconds = math.ceil(images_to_drain / self._images_per_s)
        return int(min(MAX_RETRY_AFTER_S, max(self.retry_after_s, seconds)))

    def _release(self, n_images: int, submitted: bool) -> None:
        self._admitted_images -= n_images
        self._admitted_by_kind[request_kind(n_images)] -= n_images
        if self._admitted_images == 0:
            self._idle.set()
        if not submitted:
            self._incoming -= 1
            self._wake.set()  # a partial batch need not wait for this one any more
        self._set_depth()

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._admitted_images)

    async def _submit(self, images: np.ndarray, include_members: bool) -> list[ImageScore]:
        self._incoming -= 1
        loop = asyncio.get_running_loop()
        jobs = [
            _Job(images[start : start + self.max_batch_size], include_members, loop.create_future())
            for start in range(0, len(images), self.max_batch_size)
        ]
        self._pending.extend(jobs)
        self._wake.set()
        try:
            chunks = await asyncio.gather(*(job.future for job in jobs))
        except BaseException:
            for job in jobs:
                job.future.cancel()  # the collector skips cancelled jobs
            raise
        return [result for chunk in chunks for result in chunk]

    # -- the collector -------------------------------------------------------------

    def start(self) -> None:
        """Start the collector task; call from the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._collect(), name="gradunc-batcher"
            )

    async def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop admitting; score what was already admitted, then stop collecting.

        Requests admitted before the call (queued, or still decoding) are scored and
        answered for up to ``drain_timeout_s``; whatever is left after that gets a 503.
        New requests get a 503 from the start.
        """
        self._closed = True
        if self._task is not None and drain_timeout_s > 0:
            try:
                await asyncio.wait_for(self._drained(), drain_timeout_s)
            except TimeoutError:
                logger.warning(
                    "shutting down with %d images still admitted after %.1f s of draining",
                    self._admitted_images,
                    drain_timeout_s,
                )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(
                    NotReady("the service is shutting down", retry_after_s=self.retry_after_s)
                )

    async def _drained(self) -> None:
        """Return once every admitted request has been answered (or has gone away)."""
        await self._idle.wait()

    def _take(self, jobs: list[_Job], size: int) -> tuple[int, bool]:
        """Move pending jobs into ``jobs`` while they fit; return (size, batch is full)."""
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # its request went away
                self._pending.popleft()
                continue
            if size + job.size > self.max_batch_size:
                return size, True
            jobs.append(self._pending.popleft())
            size += job.size
        return size, size >= self.max_batch_size

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            jobs: list[_Job] = []
            size, full = self._take(jobs, 0)
            deadline = loop.time() + self.max_wait_s
            # Hold a partial batch open only for requests already on their way.
            while not full and self._incoming > 0:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
                size, full = self._take(jobs, size)
            if jobs:
                await self._execute(jobs)

    async def _execute(self, jobs: list[_Job]) -> None:
        """Score one batch and hand each job its part. Any failure, in the engine or in
        handing out the answers, fails the jobs still waiting: the collector goes on, so
        one bad batch never leaves later requests unanswered."""
        images = np.concatenate([job.images for job in jobs])  # (B, 28, 28)
        include_members = any(job.include_members for job in jobs)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._executor, self._score, images, include_members
            )
            if len(results) != len(images):
                raise RuntimeError(f"engine returned {len(results)} results for {len(images)}")
            self._record_speed(len(images), time.perf_counter() - started)
            self._deliver(jobs, results, include_members)
        except Exception as error:
            logger.exception("scoring a batch of %d images failed", len(images))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(
                        EngineFailed(
                            f"scoring failed for the batch of {len(images)} images this "
                            f"request was part of ({type(error).__name__}); "
                            "the server log has the details"
                        )
                    )

    def _record_speed(self, images: int, elapsed: float) -> None:
        if elapsed > 0:
            rate = images / elapsed
            self._images_per_s = (
                rate
                if self._images_per_s is None
                else (1 - _RATE_SMOOTHING) * self._images_per_s + _RATE_SMOOTHING * rate
            )
        if self._metrics is not None:
            self._metrics.engine_seconds.observe(elapsed)
            self._metrics.batch_size.observe(images)

    @staticmethod
    def _deliver(jobs: list[_Job], results: list[ImageScore], include_members: bool) -> None:
        """Each job its own slice; members only for the requests that asked for them."""
        offset = 0
        for job in jobs:
            chunk = results[offset : offset + job.size]
            offset += job.size
            if include_members and not job.include_members:
                chunk = [dataclasses.replace(result, members=None) for result in chunk]
            if not job.future.done():
                job.future.set_result(chunk)


class Admission:
    """Room reserved in the queue for one request; use as an async context manager."""

    def __init__(self, batcher: DynamicBatcher, n_images: int) -> None:
        self._batcher = batcher
        self._n_images = n_images
        self._submitted = False
        self._released = False

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._release(self._n_images, self._submitted)

    async def score(self, images: np.ndarray, include_members: bool) -> list[ImageScore]:
        """Score ``images`` (n, 28, 28) uint8 through the batcher; results in input order."""
        if self._submitted or self._released:
            raise RuntimeError("an admission is submitted once")
        if len(images) != self._n_images:
            raise ValueError(f"admitted {self._n_images} images, submitted {len(images)}")
        self._submitted = True
        return await self._batcher._submit(images, include_members)
