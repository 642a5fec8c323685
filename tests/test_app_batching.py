"""The dynamic batcher on its own: gathering, limits, order, errors, the bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.batching import DynamicBatcher, EngineFailed
from app.errors import QueueFull
from scoring.runtime import ImageScore, MemberDetail


def images(*markers: int) -> np.ndarray:
    batch = np.zeros((len(markers), 28, 28), dtype=np.uint8)  # (n, 28, 28)
    batch[:, 0, 0] = markers
    return batch


def answer(marker: int, include_members: bool) -> ImageScore:
    """The runtime's own answer type, its prediction the image's marker."""
    members = [MemberDetail(0, marker, [0.1] * 10, 2.3, 0.1, {}, {})] if include_members else None
    return ImageScore(
        marker, str(marker), [0.1] * 10, 2.3, 0.1, {}, {}, 0.5, 0.5, False, "v", members
    )


class RecordingEngine:
    """Answers each image with its marker as the prediction (the runtime's ImageScore);
    records batch sizes and the threads it ran on."""

    def __init__(self, fail_on: int | None = None, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self.gate = gate

    def __call__(self, batch: np.ndarray, include_members: bool) -> list[ImageScore]:
        if self.gate is not None:
            self.gate.wait(10)
        markers = [int(m) for m in batch[:, 0, 0]]
        self.batches.append(markers)
        self.threads.add(threading.current_thread().name)
        if self.fail_on in markers:
            raise RuntimeError("boom")
        return [answer(m, include_members) for m in markers]


async def with_batcher(engine, body, **options):
    executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
    batcher = DynamicBatcher(
        engine,
        executor,
        max_batch_size=options.pop("max_batch_size", 4),
        max_wait_s=options.pop("max_wait_s", 0.05),
        queue_max=options.pop("queue_max", 100),
    )
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()
        executor.shutdown()


async def request(batcher: DynamicBatcher, markers, include_members=False):
    async with batcher.admit(len(markers)) as admission:
        return await admission.score(images(*markers), include_members)


def test_concurrent_requests_share_a_batch_and_keep_their_order() -> None:
    engine = RecordingEngine()

    async def body(batcher):
        return await asyncio.gather(*(request(batcher, [m]) for m in range(1, 9)))

    results = asyncio.run(with_batcher(engine, body, max_batch_size=4))
    assert [r[0].prediction for r in results] == list(range(1, 9))
    assert sorted(m for batch in engine.batches for m in batch) == list(range(1, 9))
    assert all(len(batch) <= 4 for batch in engine.batches)
    assert len(engine.batches) < 8  # gathered, not one call per request
    assert engine.threads == {"engine_0"}  # inference never on the event loop's thread


def test_a_large_request_is_split_and_reassembled_in_order() -> None:
    engine = RecordingEngine()
    markers = list(range(1, 12))

    async def body(batcher):
        return await request(batcher, markers)

    results = asyncio.run(with_batcher(engine, body, max_batch_size=4))
    assert [r.prediction for r in results] == markers
    assert [len(batch) for batch in engine.batches] == [4, 4, 3]


def test_a_lone_request_does_not_wait_for_company() -> None:
    engine = RecordingEngine()

    async def body(batcher):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await request(batcher, [1])
        return loop.time() - started

    elapsed = asyncio.run(with_batcher(engine, body, max_wait_s=5.0))
    assert elapsed < 5.0  # would be >= 5 s if the batcher held the batch open


def test_an_engine_error_fails_only_the_requests_of_that_batch() -> None:
    engine = RecordingEngine(fail_on=13)

    async def body(batcher):
        bad = await asyncio.gather(request(batcher, [13, 14]), return_exceptions=True)
        good = await request(batcher, [15])
        return bad[0], good

    bad, good = asyncio.run(with_batcher(engine, body))
    assert isinstance(bad, EngineFailed)
    assert "scoring failed for the batch of 2 images" in bad.detail
    assert good == [answer(15, include_members=False)]


def test_members_are_stripped_for_requests_that_did_not_ask() -> None:
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)

    async def body(batcher):
        first = asyncio.ensure_future(request(batcher, [1]))
        await asyncio.sleep(0.05)  # the first batch is in the engine, held by the gate
        plain = asyncio.ensure_future(request(batcher, [2]))
        detailed = asyncio.ensure_future(request(batcher, [3], include_members=True))
        await asyncio.sleep(0.05)
        gate.set()
        # a bounded wait: a batcher that loses the answers must fail here, not hang
        return await asyncio.wait_for(asyncio.gather(first, plain, detailed), 10)

    first, plain, detailed = asyncio.run(with_batcher(engine, body))
    assert engine.batches == [[1], [2, 3]]
    assert plain == [answer(2, include_members=False)]
    assert detailed == [answer(3, include_members=True)]


def test_a_full_queue_refuses_with_queue_full() -> None:
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)

    async def body(batcher):
        held = asyncio.ensure_future(request(batcher, [1, 2, 3]))
        await asyncio.sleep(0.02)
        assert batcher.depth == 3
        with pytest.raises(QueueFull, match="3 images waiting, 2 more would exceed the limit of 4"):
            batcher.admit(2)
        small = batcher.admit(1)  # still room for one
        small.release()
        gate.set()
        await held
        return batcher.depth

    assert asyncio.run(with_batcher(engine, body, queue_max=4)) == 0


def test_a_request_that_fails_before_submitting_releases_its_room() -> None:
    engine = RecordingEngine()

    async def body(batcher):
        with pytest.raises(ValueError, match="bad image"):
            async with batcher.admit(3):
                raise ValueError("bad image")
        return batcher.depth

    assert asyncio.run(with_batcher(engine, body)) == 0


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        DynamicBatcher(RecordingEngine(), None, max_batch_size=0, max_wait_s=0, queue_max=1)


# -- fair admission between single images and batches --------------------------------


def test_a_kind_alone_may_use_the_whole_queue() -> None:
    async def body(batcher):
        batches = [batcher.admit(4), batcher.admit(4)]  # all 8 slots, no single around
        for admission in batches:
            admission.release()
        singles = [batcher.admit(1) for _ in range(8)]  # and all 8 for single images
        with pytest.raises(QueueFull, match="8 images waiting, 1 more would exceed"):
            batcher.admit(1)
        for admission in singles:
            admission.release()
        return batcher.depth

    assert asyncio.run(with_batcher(RecordingEngine(), body, queue_max=8)) == 0


def test_while_both_kinds_contend_neither_holds_more_than_half_the_queue() -> None:
    async def body(batcher):
        singles = [batcher.admit(1) for _ in range(6)]  # singles alone: 6 of 8
        with pytest.raises(QueueFull, match="6 images waiting, 4 more would exceed"):
            batcher.admit(4)  # no room for the batch: it now contends
        # The freed slots go to nobody beyond half the queue while batches wait.
        singles.pop().release()
        singles.pop().release()
        with pytest.raises(QueueFull, match="share for single requests is taken: 4 of their"):
            batcher.admit(1)
        batch = batcher.admit(4)  # the batch gets the other half
        with pytest.raises(QueueFull, match="8 images waiting"):
            batcher.admit(1)
        batch.release()
        with pytest.raises(QueueFull, match="half the queue \\(4 of GRADUNC_QUEUE_MAX=8\\)"):
            batcher.admit(1)  # batches still contend: a request of theirs was just admitted
        for admission in singles:
            admission.release()
        return batcher.depth

    assert asyncio.run(with_batcher(RecordingEngine(), body, queue_max=8)) == 0


def test_a_batch_larger_than_half_the_queue_gets_in_when_its_kind_holds_nothing() -> None:
    async def body(batcher):
        single = batcher.admit(1)
        large = batcher.admit(6)  # more than half of 8, but batches held nothing
        assert batcher.depth == 7
        large.release()
        single.release()
        return batcher.depth

    assert asyncio.run(with_batcher(RecordingEngine(), body, queue_max=8)) == 0


def test_retry_after_is_the_time_the_queue_needs_to_drain() -> None:
    class SlowEngine(RecordingEngine):
        def __call__(self, batch, include_members):
            time.sleep(0.05 * len(batch))  # 20 images per second
            return super().__call__(batch, include_members)

    async def body(batcher):
        await request(batcher, [1, 2, 3, 4])  # the batcher measures the engine's rate
        held = [batcher.admit(50), batcher.admit(50)]
        with pytest.raises(QueueFull) as refused:
            batcher.admit(40)  # 40 images must drain first: about 2 s at 20 per second
        for admission in held:
            admission.release()
        return refused.value

    refused = asyncio.run(with_batcher(SlowEngine(), body, queue_max=100))
    retry_after = int(refused.headers["Retry-After"])
    assert 2 <= retry_after <= 4, refused.headers
    assert f"retry in {retry_after} s" in refused.detail


def test_a_batch_whose_answers_cannot_be_handed_out_fails_and_the_next_is_served() -> None:
    """Before this was fixed, a mixed include_members batch raised while handing out the
    answers; the collector task died and every later request waited forever."""
    gate = threading.Event()

    class UnsplittableEngine(RecordingEngine):
        def __call__(self, batch, include_members):
            answers = super().__call__(batch, include_members)
            if include_members:  # members cannot be stripped from these for plain requests
                return [{"prediction": a.prediction, "members": a.members} for a in answers]
            return answers

    engine = UnsplittableEngine(gate=gate)

    async def body(batcher):
        first = asyncio.ensure_future(request(batcher, [1]))
        await asyncio.sleep(0.05)
        mixed = [
            asyncio.ensure_future(request(batcher, [2])),
            asyncio.ensure_future(request(batcher, [3], include_members=True)),
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await first
        outcomes = await asyncio.wait_for(asyncio.gather(*mixed, return_exceptions=True), 10)
        after = await asyncio.wait_for(request(batcher, [4]), 10)
        return outcomes, after

    outcomes, after = asyncio.run(with_batcher(engine, body))
    assert engine.batches == [[1], [2, 3], [4]]
    assert all(isinstance(outcome, EngineFailed) for outcome in outcomes)
    assert "batch of 2 images" in str(outcomes[0])
    assert after == [answer(4, include_members=False)]
