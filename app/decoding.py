"""Decoding uploads in a few worker processes, bounded in time and in memory.

Untrusted image files are decoded by ``scoring.preprocessing.prepare_files`` in a small
pool of worker processes (pebble's ``ProcessPool``), never in the serving process, so:

- **memory**: what a decoder allocates lives in a worker. Each worker's address space is
  capped at its size after start-up plus ``GRADUNC_DECODE_MEMORY_MB`` (``RLIMIT_AS``), so
  a decode that would need more fails there with ``MemoryError`` (413); and after every
  request a worker hands its freed heap back to the system (glibc's ``malloc_trim``), so
  one large decode does not leave the process large.
- **time**: one request's decoding that runs longer than ``GRADUNC_DECODE_TIMEOUT_S`` is
  stopped by ending its worker (pebble starts a new one) and answered 413.
- **crashes**: a decoder that kills its worker (a segfault in a C decoder, the kernel's
  out-of-memory killer) fails only that request, with 422.
- **abandoned requests**: when the client goes away, the request's task is cancelled, and
  a running one is stopped the same way.

One task decodes all the files of one request: the headers first, then the request's
budget of pixels times frames, then the pixels, so a request over any limit costs no
decoding at all. Workers start from a ``forkserver`` process that has imported the
preprocessing once (no ``fork`` of the multi-threaded server).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from pebble import ProcessExpired, ProcessPool

from app.errors import PayloadTooLarge, ServiceUnavailable, UnprocessableContent
from scoring.preprocessing import ImageDecodeError, prepare_files

__all__ = ["DecodeLimits", "DecodePool"]

logger = logging.getLogger(__name__)

#: What a worker returns instead of raising when the decode ran out of its memory cap
#: (numpy's MemoryError subclass does not pickle reliably).
_OUT_OF_MEMORY = "out-of-memory"


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
    files: Sequence[bytes], limits: DecodeLimits
) -> np.ndarray | ImageDecodeError | str:
    """The task: the request's files as network inputs, or the error to answer with."""
    try:
        return prepare_files(
            files,
            max_pixels=limits.max_pixels,
            max_frames=limits.max_frames,
            max_total_pixels=limits.max_total_pixels,
        )
    except ImageDecodeError as error:
        error.__traceback__ = None  # nothing of the worker's stack travels back
        error.__cause__ = error.__context__ = None
        return error
    except MemoryError:
        return _OUT_OF_MEMORY
    except Exception as error:  # untrusted bytes: whatever a decoder raises is the input's
        return ImageDecodeError(f"cannot process the image: {type(error).__name__}: {error}")
    finally:
        _libc_trim()


# -- in the serving process -------------------------------------------------------------


class DecodePool:
    """A few decode worker processes, one task per request."""

    def __init__(
        self, *, workers: int, timeout_s: float, memory_bytes: int, limits: DecodeLimits
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.limits = limits
        self._pool: ProcessPool | None = None

    def start(self) -> None:
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
        self._pool = ProcessPool(
            max_workers=self.workers,
            initializer=_initialize_worker,
            initargs=(self.memory_bytes,),
            context=context,
        )

    def stop(self) -> None:
        """Stop the workers at once (a decode still running is abandoned)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=10)
            self._pool = None

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (tests and memory measurements)."""
        if self._pool is None:
            return []
        workers = self._pool._pool_manager.worker_manager.workers  # pebble has no accessor
        return [worker.pid for worker in workers.values() if worker.pid is not None]

    async def prepare(self, files: Sequence[bytes]) -> np.ndarray:
        """Network inputs (n, 28, 28) uint8 for the files of one request.

        Raises ``ImageDecodeError`` (with ``index``) for a bad file or a request over a
        limit, and a :class:`ServiceError` when decoding ran out of time or memory or
        crashed.
        """
        if self._pool is None:
            raise ServiceUnavailable("the service is shutting down")
        if not self._pool.active:  # the pool broke (its fork server died): a new one
            logger.warning("the decode pool stopped working; starting a new one")
            self.stop()
            self.start()
        assert self._pool is not None
        future = self._pool.schedule(
            _prepare_request, (list(files), self.limits), timeout=self.timeout_s
        )
        try:
            outcome = await asyncio.wrap_future(future)
        except TimeoutError:
            raise PayloadTooLarge(
                f"decoding the request's {len(files)} image(s) took longer than "
                f"{self.timeout_s:g} s, the limit (GRADUNC_DECODE_TIMEOUT_S); send smaller "
                "images",
                limit="GRADUNC_DECODE_TIMEOUT_S",
                limit_value=self.timeout_s,
            ) from None
        except ProcessExpired as error:
            logger.warning("a decode worker died (exit code %s) decoding a request", error.exitcode)
            raise UnprocessableContent(
                f"the image decoder crashed on the request's {len(files)} image(s) "
                f"(worker exit code {error.exitcode}); the files are probably corrupt"
            ) from None
        except FutureCancelled:
            raise ServiceUnavailable("the service is shutting down") from None
        except BrokenProcessPool as error:
            logger.error("the decode pool is broken (%s); it restarts on the next request", error)
            raise ServiceUnavailable(
                "the image decoders are restarting; retry in a moment", retry_after_s=1
            ) from None
        if isinstance(outcome, ImageDecodeError):
            raise outcome
        if isinstance(outcome, str):  # _OUT_OF_MEMORY
            memory_mb = self.memory_bytes // (1024 * 1024)
            raise PayloadTooLarge(
                f"decoding the request's {len(files)} image(s) needs more than {memory_mb} MB, "
                "the limit (GRADUNC_DECODE_MEMORY_MB); send smaller images",
                limit="GRADUNC_DECODE_MEMORY_MB",
                limit_value=memory_mb,
            )
        return outcome
