"""Decoding uploads in a few worker processes, bounded in time and in memory.

Untrusted image files are decoded by ``scoring.preprocessing.prepare_files`` in a small
pool of worker processes, never in the serving process, so:

- **memory**: what a decoder allocates lives in a worker. Each worker's address space is
  capped at its size after start-up plus ``GRADUNC_DECODE_MEMORY_MB`` (``RLIMIT_AS``), so
  a decode that would need more fails there with ``MemoryError`` (413); and after every
  request a worker hands its freed heap back to the system (glibc's ``malloc_trim``), so
  one large decode does not leave the process large.
- **time**: one request's decoding that runs longer than ``GRADUNC_DECODE_TIMEOUT_S`` is
  stopped by ending its worker (a new one starts for the next request) and answered 413.
- **crashes**: a decoder that kills its worker (a segfault in a C decoder, the kernel's
  out-of-memory killer) fails only that request, with 422.
- **abandoned requests**: when the client goes away, the request's task is cancelled, and
  a running decode is stopped the same way.
- **a compromised decoder**: a worker answers in a fixed binary format, never a pickle:
  the pixels as raw bytes of the one size the request can have, or an error as JSON. So
  an exploit in a C decoder that takes over a worker cannot run code in the server by
  what it sends back (an unpickled reply could).

A worker reads the headers of all the files of a request first, then checks the
request's budget of pixels times frames, then decodes the pixels, so a request over any
limit costs no decoding at all. A request of many files is split into parts across idle
workers; each part reads every header, so each refuses exactly what the whole would.
Workers start from a ``forkserver`` process that has imported the preprocessing once
(no ``fork`` of the multi-threaded server).

Why not a process-pool library: pebble's ``ProcessPool`` (used before) runs three
threads of its own and hands every task through two of them, which cost about 0.4 ms of
a single-image request's 9 ms on two cores, and its replies are pickles. Here the event
loop talks to each worker directly over a non-blocking socket pair
(``loop.sock_sendall`` / ``loop.sock_recv_into``), and a worker slot is an item of an
``asyncio.Queue``. The files go to a worker straight from the request's buffers, so a
31 MB upload holds the loop for about 5 ms (pebble's pickling: about 20 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import json
import logging
import multiprocessing
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

from app.errors import PayloadTooLarge, ServiceUnavailable, UnprocessableContent
from scoring.features import IMAGE_SIZE
from scoring.preprocessing import ImageDecodeError, ImageTooLarge, prepare_files, rebuild_error

__all__ = ["DecodeLimits", "DecodePool"]

logger = logging.getLogger(__name__)

#: What a worker returns instead of raising when the decode ran out of its memory cap.
_OUT_OF_MEMORY = "out-of-memory"

#: A request to a worker: the number of files and the part to decode (start, stop), then
#: each file's length, then the files' bytes. No pickle either way, and no copy of the
#: files in the server: the event loop sends them from the request's own buffers.
_REQUEST_HEADER = struct.Struct("!III")
_FILE_LENGTH = struct.Struct("!Q")
#: A reply: one kind byte and the payload's length, then the payload.
_REPLY_HEADER = struct.Struct("!cQ")
_IMAGES = b"I"  # payload: the network inputs, (n, 28, 28) uint8, C order
_REFUSED = b"E"  # payload: an ImageDecodeError as JSON (see _error_reply)
_NO_MEMORY = b"M"  # no payload: the decode ran out of the worker's memory cap
#: Longest error reply the server reads; anything longer is a malformed reply.
_MAX_ERROR_BYTES = 64 * 1024
#: Longest text of an error reply a worker sends (a message is a sentence or two).
_MAX_TEXT = 2000
_PIXELS_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE
#: What a worker sends once it is ready for requests (its start-up re-imports the main
#: module, which the decode timeout should not count).
_READY = b"R"
#: How long a new worker may take to get ready.
_START_TIMEOUT_S = 60.0
#: Fewest files a worker decodes when a request is split across idle workers: every
#: part reads all the request's headers (about 16 us a file, for the request's budget)
#: and costs a round trip (about 0.3 ms), against about 70 us a file of decoding saved.
MIN_FILES_PER_PART = 8
#: How long a stopped worker may take to go (its exit code is read for the log).
_EXIT_WAIT_S = 1.0


@dataclass(frozen=True)
class DecodeLimits:
    """The limits ``prepare_files`` checks before decoding (see its parameters)."""

    max_pixels: int
    max_frames: int
    max_total_pixels: int


# -- in the worker process -------------------------------------------------------------


def _address_space_bytes() -> int | None:
    """The worker's current virtual size (Linux ``VmSize``), None where unknown."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _initialize_worker(memory_bytes: int) -> None:
    """Cap the worker's memory; switch off Pillow's own bomb guard (ours is exact)."""
    from PIL import Image

    # prepare_files checks the exact pixel count from the header against a far lower
    # limit; Pillow's guard fires inside Image.open, before the size can be reported.
    Image.MAX_IMAGE_PIXELS = None
    current = _address_space_bytes()
    if current is None:
        return
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = current + memory_bytes
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, ValueError, OSError) as error:  # not Linux, or not allowed
        logger.warning("decode worker runs without a memory cap: %s", error)
    _malloc_trim()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (looked up once: find_library is slow)."""
    name = ctypes.util.find_library("c")
    try:
        return None if name is None else ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def _libc_trim() -> None:
    """Give freed heap memory back to the system (glibc only; elsewhere a no-op)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _prepare_request(
    files: Sequence[bytes], part: range, limits: DecodeLimits
) -> np.ndarray | ImageDecodeError | str:
    """The task: the part's files as network inputs, or the error to answer with."""
    try:
        return prepare_files(
            files,
            max_pixels=limits.max_pixels,
            max_frames=limits.max_frames,
            max_total_pixels=limits.max_total_pixels,
            part=part,
        )
    except ImageDecodeError as error:
        return error
    except MemoryError:
        return _OUT_OF_MEMORY
    except Exception as error:  # untrusted bytes: whatever a decoder raises is the input's
        return ImageDecodeError(f"cannot process the image: {type(error).__name__}: {error}")
    finally:
        _libc_trim()


def _error_reply(error: ImageDecodeError) -> bytes:
    """An ImageDecodeError as JSON: its message, whether it is a limit, and its fields.

    Texts are cut to ``_MAX_TEXT`` characters, so the reply stays far below what the
    server reads (``_MAX_ERROR_BYTES``).
    """

    def bounded(value: object) -> object:
        if isinstance(value, str):
            return value[:_MAX_TEXT]
        return value if value is None or isinstance(value, bool | int | float) else None

    document = {
        "too_large": isinstance(error, ImageTooLarge),
        "message": str(error)[:_MAX_TEXT],
        "fields": {str(key): bounded(value) for key, value in vars(error).items()},
    }
    return json.dumps(document).encode()


def _reply(outcome: np.ndarray | ImageDecodeError | str) -> tuple[bytes, bytes]:
    """The reply's kind and payload for what :func:`_prepare_request` returned."""
    if isinstance(outcome, ImageDecodeError):
        return _REFUSED, _error_reply(outcome)
    if isinstance(outcome, str):
        return _NO_MEMORY, b""
    return _IMAGES, np.ascontiguousarray(outcome, dtype=np.uint8).tobytes()


def _receive(channel: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes; EOFError when the server closed the channel."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = channel.recv_into(view[received:])
        if count == 0:
            raise EOFError
        received += count
    return bytes(buffer)


def _receive_request(channel: socket.socket) -> tuple[list[bytes], range]:
    """One request's files and the part of them to decode (see _REQUEST_HEADER)."""
    count, start, stop = _REQUEST_HEADER.unpack(_receive(channel, _REQUEST_HEADER.size))
    lengths = struct.unpack(f"!{count}Q", _receive(channel, count * _FILE_LENGTH.size))
    return [_receive(channel, length) for length in lengths], range(start, stop)


def _serve(channel: socket.socket, memory_bytes: int, limits: DecodeLimits) -> None:
    """A worker's life: one request in, one reply out, until the server closes the channel."""
    _initialize_worker(memory_bytes)
    with channel, contextlib.suppress(EOFError, OSError):  # the server stopped or let go
        channel.sendall(_READY)  # the decode timeout starts counting from here
        while True:
            files, part = _receive_request(channel)
            kind, payload = _reply(_prepare_request(files, part, limits))
            channel.sendall(_REPLY_HEADER.pack(kind, len(payload)))
            channel.sendall(payload)


# -- in the serving process -------------------------------------------------------------


class _BrokenWorker(Exception):
    """The worker's channel closed or its reply was malformed: it cannot be used again."""


@dataclass(eq=False)  # identity: a set of the running ones
class _Worker:
    """One worker process and the server's end of its channel (a non-blocking socket the
    event loop reads and writes with ``sock_recv_into`` and ``sock_sendall``)."""

    process: BaseProcess
    channel: socket.socket
    #: An exchange is reading or writing the channel: it closes the channel when done
    #: (closing a socket the loop still watches would leave that exchange hanging).
    busy: bool = False

    def stop(self) -> None:
        """End the worker at once (a decode still running is abandoned): the channel is
        shut down, which wakes an exchange waiting on it with end-of-file."""
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_RDWR)
        if not self.busy:
            self.channel.close()
        if self.process.is_alive():
            self.process.kill()

    async def receive(self, size: int) -> bytes:
        """Exactly ``size`` bytes from the worker; _BrokenWorker at end-of-file."""
        loop = asyncio.get_running_loop()
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            count = await loop.sock_recv_into(self.channel, view[received:])
            if count == 0:
                raise _BrokenWorker(f"the channel closed after {received} of {size} bytes")
            received += count
        return bytes(buffer)

    async def exit_code(self) -> int | None:
        """The exit code once the process is gone (negative: the signal that ended it)."""
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, _EXIT_WAIT_S)
        return self.process.exitcode


def _check_reply(kind: bytes, payload: bytes, count: int) -> None:
    """Raise _BrokenWorker unless the reply has a known kind and that kind's form."""
    if kind == _IMAGES and len(payload) == count * _PIXELS_PER_IMAGE:
        return
    if kind == _NO_MEMORY and not payload:
        return
    if kind == _REFUSED:
        try:
            if isinstance(json.loads(payload), dict):
                return
        except ValueError:
            pass
    raise _BrokenWorker(f"a malformed reply (kind {kind!r}, {len(payload)} bytes)")


def _decode_error(document: dict[str, Any]) -> ImageDecodeError:
    """The ImageDecodeError (or ImageTooLarge) a worker sent as JSON."""
    kind = ImageTooLarge if document.get("too_large") else ImageDecodeError
    fields = document.get("fields")
    error = rebuild_error(
        kind,
        (str(document.get("message", "cannot decode the image")),),
        {str(key): value for key, value in fields.items()} if isinstance(fields, dict) else {},
    )
    index = getattr(error, "index", None)
    error.index = index if isinstance(index, int) else None
    return error


def _restarting() -> ServiceUnavailable:
    """The 503 for a worker that could not be started (the next request tries again)."""
    return ServiceUnavailable(
        "the image decoders are restarting; retry in a moment", retry_after_s=1
    )


class DecodePool:
    """A few decode worker processes, one request at a time each.

    A worker slot is an item of a queue: a running worker, or None where one is to be
    started (at first use, and after a worker was stopped or died). A request takes a
    slot, waiting its turn when every worker is busy, and puts it back when answered.
    """

    def __init__(
        self, *, workers: int, timeout_s: float, memory_bytes: int, limits: DecodeLimits
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.limits = limits
        self._slots: asyncio.Queue[_Worker | None] | None = None
        self._running: set[_Worker] = set()
        self._waiting = 0  # requests waiting for a slot
        self._context: Any = None

    def start(self) -> None:
        """Open the slots; workers start at first use (:meth:`start_workers` starts all)."""
        context = multiprocessing.get_context("forkserver")
        # The fork server imports the preprocessing (numpy, Pillow) once; each worker is
        # a fork of it, so a worker that was stopped is replaced in milliseconds. A new
        # worker also re-runs the parent's main module (multiprocessing's rule), which is
        # app.main or a script importing it: with the heavy part of what it imports
        # preloaded, that costs a worker little (shared pages) instead of some 100 MB and
        # a second. Not app.main itself: runpy warns when it re-runs a loaded module.
        context.set_forkserver_preload(
            ["scoring.preprocessing", "fastapi", "uvicorn", "app.service", "app.routes.scoring"]
        )
        self._context = context
        self._slots = asyncio.Queue()
        for _ in range(self.workers):
            self._slots.put_nowait(None)

    async def start_workers(self) -> None:
        """Start every worker now, so that the first requests do not wait for them."""
        slots = self._open_slots()
        taken = [await slots.get() for _ in range(self.workers)]
        try:
            for index, worker in enumerate(taken):
                if worker is None:
                    taken[index] = await self._start_worker()
        finally:
            for worker in taken:
                slots.put_nowait(worker)

    async def stop(self) -> None:
        """Stop the workers at once (a decode still running is abandoned)."""
        slots, self._slots = self._slots, None
        running = list(self._running)
        self._running.clear()
        for worker in running:
            worker.stop()
        for worker in running:
            await worker.exit_code()
        if slots is not None:
            slots.put_nowait(None)  # wakes a request still waiting; it answers 503

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (tests and memory measurements)."""
        return [worker.process.pid for worker in self._running if worker.process.pid]

    def _open_slots(self) -> asyncio.Queue[_Worker | None]:
        if self._slots is None:
            raise ServiceUnavailable("the service is shutting down")
        return self._slots

    async def _start_worker(self) -> _Worker:
        """A new worker from the fork server, connected to this event loop."""
        server_end, worker_end = socket.socketpair()
        process = self._context.Process(
            target=_serve,
            args=(worker_end, self.memory_bytes, self.limits),
            name="gradunc-decode",
            daemon=True,
        )
        try:
            # start() talks to the fork server (and starts it the first time): a thread.
            await asyncio.get_running_loop().run_in_executor(None, process.start)
        except BaseException as error:
            server_end.close()  # a worker started all the same finds its channel closed
            if not isinstance(error, Exception):
                raise  # cancelled
            logger.error("starting a decode worker failed: %s", error)
            raise _restarting() from None
        finally:
            worker_end.close()  # the worker has its own copy
        server_end.setblocking(False)
        worker = _Worker(process, server_end, busy=True)
        self._running.add(worker)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                ready = await worker.receive(len(_READY))
            if ready != _READY:
                raise _BrokenWorker(f"a new worker sent {ready!r}")
        except BaseException as error:
            worker.busy = False
            self._discard(worker)
            if not isinstance(error, Exception):
                raise  # cancelled
            logger.error("a new decode worker did not get ready: %s", type(error).__name__)
            raise _restarting() from None
        worker.busy = False
        return worker

    def _discard(self, worker: _Worker) -> None:
        self._running.discard(worker)
        worker.stop()

    async def prepare(self, files: Sequence[bytes]) -> np.ndarray:
        """Network inputs (n, 28, 28) uint8 for the files of one request.

        A request of at least ``2 * MIN_FILES_PER_PART`` files is split into contiguous
        parts across the workers that are idle right then and that no other request is
        waiting for (it never waits for a second one); answers and errors are those of
        one worker decoding it all, the first failing file in the request's order.

        Raises ``ImageDecodeError`` (with ``index``) for a bad file or a request over a
        limit, and a :class:`ServiceError` when decoding ran out of time or memory or
        crashed.
        """
        slots = self._open_slots()
        self._waiting += 1
        try:
            taken = [await slots.get()]
        finally:
            self._waiting -= 1
        # Only slots no other request is waiting for (a woken waiter has not taken its
        # slot yet): a split must never make another request wait longer.
        wanted = min(self.workers, len(files) // MIN_FILES_PER_PART)
        while len(taken) < wanted and self._waiting == 0:
            try:
                idle = slots.get_nowait()
            except asyncio.QueueEmpty:
                break
            if idle is None:  # starting a worker costs more than the split saves
                slots.put_nowait(idle)
                break
            taken.append(idle)
        bounds = np.linspace(0, len(files), len(taken) + 1).round().astype(int)
        parts = [range(int(start), int(stop)) for start, stop in itertools.pairwise(bounds)]
        if len(taken) == 1:
            return await self._decode_part(slots, taken[0], files, parts[0])
        outcomes = await asyncio.gather(
            *(
                self._decode_part(slots, worker, files, part)
                for worker, part in zip(taken, parts, strict=True)
            ),
            return_exceptions=True,
        )
        decoded = []
        for outcome in outcomes:  # the first failure in the request's order
            if isinstance(outcome, BaseException):
                raise outcome
            decoded.append(outcome)
        return np.concatenate(decoded)

    async def _decode_part(
        self,
        slots: asyncio.Queue[_Worker | None],
        worker: _Worker | None,
        files: Sequence[bytes],
        part: range,
    ) -> np.ndarray:
        """One worker's share of a request, on the slot taken for it (put back after)."""
        try:
            if self._slots is not slots:  # stopped while this request waited
                raise ServiceUnavailable("the service is shutting down")
            if worker is not None and not worker.process.is_alive():
                self._discard(worker)  # died while idle (the OOM killer, a signal)
                worker = None
            if worker is None:
                worker = await self._start_worker()
            kind, payload = await self._exchange(worker, files, part)
        except BaseException:
            if worker is not None and worker not in self._running:
                worker = None  # _exchange stopped it
            raise
        finally:
            slots.put_nowait(worker)
        return self._outcome(kind, payload, len(part))

    async def _exchange(
        self, worker: _Worker, files: Sequence[bytes], part: range
    ) -> tuple[bytes, bytes]:
        """Send one request, read its reply; any failure stops the worker and says why."""
        loop = asyncio.get_running_loop()
        header = _REQUEST_HEADER.pack(len(files), part.start, part.stop)
        lengths = struct.pack(f"!{len(files)}Q", *(len(data) for data in files))
        longest = max(len(part) * _PIXELS_PER_IMAGE, _MAX_ERROR_BYTES)
        worker.busy = True
        try:
            async with asyncio.timeout(self.timeout_s):
                await loop.sock_sendall(worker.channel, header + lengths)
                for data in files:
                    await loop.sock_sendall(worker.channel, data)
                kind, length = _REPLY_HEADER.unpack(await worker.receive(_REPLY_HEADER.size))
                if length > longest:
                    raise _BrokenWorker(f"a reply of {length} bytes for {len(part)} file(s)")
                payload = await worker.receive(length)
            _check_reply(kind, payload, len(part))
        except TimeoutError:
            self._discard(worker)
            raise PayloadTooLarge(
                f"decoding the request's {len(files)} image(s) took longer than "
                f"{self.timeout_s:g} s, the limit (GRADUNC_DECODE_TIMEOUT_S); send smaller "
                "images",
                limit="GRADUNC_DECODE_TIMEOUT_S",
                limit_value=self.timeout_s,
            ) from None
        except (OSError, _BrokenWorker) as error:  # after TimeoutError, an OSError too
            self._discard(worker)
            if self._slots is None:  # stop() closed the channel under this request
                raise ServiceUnavailable("the service is shutting down") from None
            exit_code = await worker.exit_code()
            logger.warning(
                "a decode worker failed (%s, exit code %s) decoding a request",
                type(error).__name__,
                exit_code,
            )
            raise UnprocessableContent(
                f"the image decoder crashed on the request's {len(files)} image(s) "
                f"(worker exit code {exit_code}); the files are probably corrupt"
            ) from None
        except BaseException:  # cancelled: the client went away mid-decode
            self._discard(worker)
            raise
        finally:
            worker.busy = False
            if worker not in self._running:
                worker.channel.close()  # discarded while this exchange still used it
        return kind, payload

    def _outcome(self, kind: bytes, payload: bytes, count: int) -> np.ndarray:
        """The network inputs a well-formed reply carries, or the error it stands for."""
        if kind == _IMAGES:
            return np.frombuffer(payload, dtype=np.uint8).reshape(count, IMAGE_SIZE, IMAGE_SIZE)
        if kind == _REFUSED:
            raise _decode_error(json.loads(payload))
        memory_mb = self.memory_bytes // (1024 * 1024)
        raise PayloadTooLarge(
            f"decoding the request's {count} image(s) needs more than {memory_mb} MB, "
            "the limit (GRADUNC_DECODE_MEMORY_MB); send smaller images",
            limit="GRADUNC_DECODE_MEMORY_MB",
            limit_value=memory_mb,
        )
