"""The decode pool on its own: real worker processes, real Pillow, real PNG files.

What the HTTP tests (test_hardening, test_hostile_inputs) see from outside, here from
inside: answers equal to decoding in-process, errors that keep their fields, a worker
that dies or is abandoned costs only its own request, and a reply that is not in the
pool's format is refused instead of trusted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from app import decoding
from app.decoding import DecodeLimits, DecodePool
from app.errors import PayloadTooLarge, ServiceUnavailable, UnprocessableContent
from scoring.preprocessing import ImageDecodeError, ImageTooLarge, prepare_files
from tools.harness import png_bytes

LIMITS = DecodeLimits(max_pixels=40_000_000, max_frames=100, max_total_pixels=40_000_000)


def noise_pngs(count: int, side: int = 28) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        png_bytes(rng.integers(0, 256, size=(side, side), dtype=np.uint8)) for _ in range(count)
    ]


@functools.cache
def slow_png() -> bytes:
    """A bar on a transparent 6000x6000 canvas: about 0.6 s to decode (RGBA, ~140 MB)."""
    canvas = np.zeros((6000, 6000, 4), np.uint8)
    canvas[1500:4500, 2700:3300] = 255
    return png_bytes(canvas)


def with_pool(
    test: Callable[[DecodePool], Awaitable[Any]],
    *,
    workers: int = 1,
    timeout_s: float = 30,
    limits: DecodeLimits = LIMITS,
) -> Any:
    """Run ``test(pool)`` on a started pool in a fresh event loop; stop the pool after."""

    async def run() -> Any:
        pool = DecodePool(workers=workers, timeout_s=timeout_s, memory_bytes=1 << 30, limits=limits)
        pool.start()
        await pool.start_workers()
        try:
            return await test(pool)
        finally:
            await pool.stop()

    return asyncio.run(run())


async def wait_until_busy(pool: DecodePool, seconds: float = 0.3) -> int:
    """The pid of the (one) worker, once a request has had time to reach it."""
    await asyncio.sleep(seconds)
    [pid] = pool.worker_pids()
    return pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def decode_here(file: bytes) -> np.ndarray:
    """What prepare_files gives for one file in this process."""
    return decode_all([file])


def decode_all(files: list[bytes]) -> np.ndarray:
    """What prepare_files gives for the files in this process."""
    return prepare_files(files, max_pixels=10**8, max_frames=100, max_total_pixels=10**9)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pool_answers_what_decoding_in_process_gives(workers: int) -> None:
    files = noise_pngs(64)

    async def test(pool: DecodePool) -> np.ndarray:
        return await pool.prepare(files)

    decoded = with_pool(test, workers=workers)
    expected = prepare_files(
        files,
        max_pixels=LIMITS.max_pixels,
        max_frames=LIMITS.max_frames,
        max_total_pixels=LIMITS.max_total_pixels,
    )
    assert decoded.dtype == np.uint8 and decoded.shape == (64, 28, 28)
    np.testing.assert_array_equal(decoded, expected)


def test_a_refused_file_comes_back_with_its_index_and_a_limit_with_its_fields() -> None:
    good, large = noise_pngs(1)[0], png_bytes(np.zeros((7000, 7000), np.uint8))

    async def test(pool: DecodePool) -> tuple[BaseException, BaseException]:
        with pytest.raises(ImageDecodeError) as refused:
            await pool.prepare([good, b"not an image at all"])
        with pytest.raises(ImageTooLarge) as too_large:
            await pool.prepare([good, good, large])
        return refused.value, too_large.value

    refused, too_large = with_pool(test)
    assert type(refused) is ImageDecodeError and refused.index == 1, refused
    assert isinstance(too_large, ImageTooLarge) and too_large.index == 2
    assert (too_large.limit, too_large.limit_value) == ("max_pixels", LIMITS.max_pixels)
    assert too_large.value == 7000 * 7000 and "7000x7000" in too_large.subject
    assert str(too_large).startswith("image of 7000x7000")


def spy_on_parts(pool: DecodePool) -> list[range]:
    """Record the part of the request each worker is given (the decoding still runs)."""
    parts: list[range] = []
    decode_part = pool._decode_part

    async def recorded(slots, worker, files, part):
        parts.append(part)
        return await decode_part(slots, worker, files, part)

    pool._decode_part = recorded  # type: ignore[method-assign]
    return parts


def test_a_large_request_is_split_across_idle_workers_and_a_small_one_is_not() -> None:
    files = noise_pngs(40)

    async def test(pool: DecodePool) -> list[list[range]]:
        seen, parts = [], spy_on_parts(pool)
        for count in (40, 2 * decoding.MIN_FILES_PER_PART - 1, 1):
            decoded = await pool.prepare(files[:count])
            np.testing.assert_array_equal(decoded, decode_all(files[:count]))
            seen.append(list(parts))
            parts.clear()
        return seen

    split, unsplit, single = with_pool(test, workers=3)
    assert split == [range(0, 13), range(13, 27), range(27, 40)]
    assert unsplit == [range(0, 2 * decoding.MIN_FILES_PER_PART - 1)] and single == [range(0, 1)]


def test_a_split_request_fails_as_one_worker_would_on_the_first_bad_file() -> None:
    good = noise_pngs(32)
    late = [*good[:20], b"broken", *good[21:]]
    early_and_late = [*good[:5], b"broken too", *late[6:]]

    async def test(pool: DecodePool) -> list[BaseException]:
        errors = []
        for files in (late, early_and_late):
            with pytest.raises(ImageDecodeError) as refused:
                await pool.prepare(files)
            errors.append(refused.value)
        return errors

    async def over_budget(pool: DecodePool) -> BaseException:
        with pytest.raises(ImageTooLarge) as over:
            await pool.prepare(good)
        return over.value

    late_error, early_error = with_pool(test, workers=2)
    # Over the request's budget, the sum over both parts: refused before any decoding.
    tight = DecodeLimits(max_pixels=10_000, max_frames=1, max_total_pixels=28 * 28 * 31)
    over_budget = with_pool(over_budget, workers=2, limits=tight)
    assert late_error.index == 20 and early_error.index == 5
    assert over_budget.index is None and over_budget.limit == "max_total_pixels"
    assert over_budget.value == 28 * 28 * 32


def test_requests_beyond_the_workers_wait_their_turn_on_the_same_worker() -> None:
    files = noise_pngs(8)

    async def test(pool: DecodePool) -> tuple[list[np.ndarray], list[int]]:
        pids = pool.worker_pids()
        answers = await asyncio.gather(*(pool.prepare(files[i : i + 1]) for i in range(8)))
        return answers, pids + pool.worker_pids()

    answers, pids = with_pool(test, workers=1)
    assert len(set(pids)) == 1, pids  # one worker, kept
    for index, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, decode_here(files[index]))


def test_a_worker_killed_mid_decode_fails_only_that_request() -> None:
    slow, small = slow_png(), noise_pngs(1)

    async def test(pool: DecodePool) -> tuple[BaseException, int, list[int]]:
        request = asyncio.ensure_future(pool.prepare([slow]))
        pid = await wait_until_busy(pool)
        os.kill(pid, signal.SIGKILL)  # what a segfaulting decoder or the OOM killer does
        with pytest.raises(UnprocessableContent) as crashed:
            await request
        np.testing.assert_array_equal(await pool.prepare(small), decode_here(small[0]))
        return crashed.value, pid, pool.worker_pids()

    crashed, pid, pids_after = with_pool(test)
    assert "crashed" in str(crashed) and f"exit code {-signal.SIGKILL}" in str(crashed)
    assert pids_after and pid not in pids_after  # a new worker served the next request


def test_a_decode_over_its_time_is_stopped_and_its_worker_replaced() -> None:
    slow, small = slow_png(), noise_pngs(1)

    async def test(pool: DecodePool) -> tuple[BaseException, int, list[int]]:
        [pid] = pool.worker_pids()
        with pytest.raises(PayloadTooLarge) as late:
            await pool.prepare([slow])
        await pool.prepare(small)
        return late.value, pid, pool.worker_pids()

    late, pid, pids_after = with_pool(test, timeout_s=0.05)
    assert "GRADUNC_DECODE_TIMEOUT_S" in str(late)
    assert wait_gone(pid), "the worker that ran past its time is still running"
    assert pid not in pids_after


def test_an_abandoned_request_stops_its_worker() -> None:
    slow, small = slow_png(), noise_pngs(1)

    async def test(pool: DecodePool) -> tuple[int, list[int]]:
        request = asyncio.ensure_future(pool.prepare([slow]))
        pid = await wait_until_busy(pool, 0.1)
        request.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await request
        await pool.prepare(small)
        return pid, pool.worker_pids()

    pid, pids_after = with_pool(test)
    assert wait_gone(pid), "the abandoned decode's worker is still running"
    assert pid not in pids_after


def test_a_stopped_pool_ends_its_workers_and_answers_503() -> None:
    async def run() -> tuple[list[int], BaseException]:
        pool = DecodePool(workers=2, timeout_s=5, memory_bytes=1 << 30, limits=LIMITS)
        pool.start()
        await pool.start_workers()
        pids = pool.worker_pids()
        await pool.stop()
        with pytest.raises(ServiceUnavailable) as stopped:
            await pool.prepare(noise_pngs(1))
        return pids, stopped.value

    pids, stopped = asyncio.run(run())
    assert len(pids) == 2 and all(wait_gone(pid) for pid in pids)
    assert "shutting down" in str(stopped)


@pytest.mark.parametrize(
    ("kind", "payload", "count"),
    [
        (b"I", bytes(784 * 2 - 1), 2),  # pixels of another size than the request's
        (b"I", bytes(784 * 3), 2),
        (b"E", b"\x80\x04\x95 a pickle, not JSON", 1),
        (b"E", json.dumps(["not", "an", "object"]).encode(), 1),
        (b"M", b"x", 1),
        (b"P", b"", 1),  # no such kind
    ],
)
def test_a_reply_not_in_the_pool_format_is_refused(kind: bytes, payload: bytes, count: int) -> None:
    with pytest.raises(decoding._BrokenWorker):
        decoding._check_reply(kind, payload, count)


def test_well_formed_replies_pass_the_check() -> None:
    decoding._check_reply(b"I", bytes(784 * 2), 2)
    decoding._check_reply(b"M", b"", 1)
    decoding._check_reply(b"E", decoding._error_reply(ImageDecodeError("bad")), 1)
