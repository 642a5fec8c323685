"""The data plane: loading the bundle, readiness, decoding and scoring, no HTTP.

:class:`ScoringService` loads the scorer in the background (so /healthz answers at once),
owns the two worker pools (one engine thread, a few decode threads) and the dynamic
batcher, and answers "not ready" with the reason until the scorer is loaded and warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from app.batching import DynamicBatcher
from app.config import Settings
from app.errors import NotReady, PayloadTooLarge, UnprocessableContent
from app.metrics import ServiceMetrics
from scoring.preprocessing import SUPPORTED_FORMATS, ImageDecodeError, decode_image, prepare_image

__all__ = ["Scorer", "ScorerLoader", "ScoringService", "Upload", "load_bundle_scorer"]

logger = logging.getLogger(__name__)

#: Longest the shutdown waits for admitted requests to be scored before failing them.
DRAIN_TIMEOUT_S = 30.0


class Scorer(Protocol):
    """What the service needs of ``scoring.runtime.UncertaintyScorer``."""

    model_version: str
    providers_in_use: dict[str, str]
    evaluation: dict[str, Any]
    report_dir: Path

    def warm_up(self) -> None: ...

    def score(self, images: np.ndarray, include_members: bool = False) -> list[dict[str, Any]]: ...


ScorerLoader = Callable[[Settings], Scorer]


def load_bundle_scorer(settings: Settings) -> Scorer:
    """The real scorer: verify the bundle's hashes and create the onnxruntime sessions."""
    # Imported here, in the loading thread: onnxruntime and the meta classifiers take a
    # while to import, and /healthz should answer while they do.
    from scoring.runtime import UncertaintyScorer

    return UncertaintyScorer.from_bundle(
        settings.bundle_dir, providers=settings.providers, threads=settings.engine_threads
    )


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Upload:
    """One uploaded image and how error messages name it."""

    label: str
    data: bytes


def decode_upload(upload: Upload, max_pixels: int) -> np.ndarray:
    """Bytes of one image file -> network input (28, 28) uint8, or a 4xx error."""
    size = _header_size(upload.data)
    if isinstance(size, str) or (size is not None and size[0] * size[1] > max_pixels):
        claimed = (
            size
            if isinstance(size, str)
            else (f"image of {size[0]}x{size[1]} = {size[0] * size[1]} pixels")
        )
        raise PayloadTooLarge(
            f"{upload.label}: {claimed} is over the limit of {max_pixels} pixels "
            "(GRADUNC_MAX_IMAGE_PIXELS)",
            limit="GRADUNC_MAX_IMAGE_PIXELS",
            limit_value=max_pixels,
        )
    try:
        return prepare_image(decode_image(upload.data, max_pixels))  # (28, 28) uint8
    except ImageDecodeError as error:
        raise UnprocessableContent(f"{upload.label}: cannot decode the image: {error}") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        # Anything else Pillow raises on hostile input is still the input's fault.
        logger.warning("%s: image rejected after decoding: %r", upload.label, error)
        raise UnprocessableContent(
            f"{upload.label}: cannot process the image: {type(error).__name__}: {error}"
        ) from error


def _header_size(data: bytes) -> tuple[int, int] | str | None:
    """(width, height) from the image header alone, or None where it cannot be read.

    The pixel limit is answered 413 (not 422 like an undecodable file), so it is checked
    here first; everything else about the file is left to ``decode_image``. A header past
    even Pillow's own bomb limit is refused before its size is known: then Pillow's
    message, which names the pixel count, is returned instead.
    """
    try:
        with Image.open(BytesIO(data), formats=SUPPORTED_FORMATS) as image:
            return image.size
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        return f"image of {pixels.group(1)} pixels" if pixels else "image (a decompression bomb)"
    except Exception:
        return None


class ScoringService:
    """Bundle lifecycle, readiness and scoring for one app."""

    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, loader: ScorerLoader | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._loader = loader or load_bundle_scorer
        self.state = State.LOADING
        self.error: str | None = None
        self.scorer: Scorer | None = None
        self.batcher: DynamicBatcher | None = None
        self._load_started = time.monotonic()
        self._load_task: asyncio.Task[None] | None = None
        self._engine_pool: ThreadPoolExecutor | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        #: Execution providers asked for, and those of them no graph got (GET /readyz).
        self.requested_providers: list[str] = []
        self.unavailable_providers: list[str] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start loading the bundle in the background and return at once."""
        # One engine thread: onnxruntime parallelises inside a call, and sessions that run
        # side by side on few cores only fight each other (DESIGN.md section 7).
        self._engine_pool = ThreadPoolExecutor(1, thread_name_prefix="gradunc-engine")
        self._decode_pool = ThreadPoolExecutor(
            self.settings.decode_threads, thread_name_prefix="gradunc-decode"
        )
        self._load_started = time.monotonic()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="gradunc-load")

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            scorer = await loop.run_in_executor(self._engine_pool, self._loader, self.settings)
            await loop.run_in_executor(self._engine_pool, scorer.warm_up)
        except Exception as error:
            self.state = State.FAILED
            self.error = f"{type(error).__name__}: {error}"
            logger.error(
                "loading the bundle from %s failed, the service will not become ready: %s",
                self.settings.bundle_dir,
                self.error,
            )
            return
        assert self._engine_pool is not None  # start() made it before this task
        self.batcher = DynamicBatcher(
            scorer.score,
            self._engine_pool,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_s,
            queue_max=self.settings.queue_max,
            retry_after_s=self.settings.retry_after_s,
            metrics=self.metrics,
        )
        self.batcher.start()
        # The real scorer's engine knows which providers it asked for and did not get;
        # stand-in scorers (tests) have no engine and report nothing.
        engine = getattr(scorer, "engine", None)
        self.requested_providers = list(getattr(engine, "requested_providers", None) or [])
        self.unavailable_providers = list(getattr(engine, "unavailable_providers", None) or [])
        self.scorer = scorer
        self.state = State.READY
        self.metrics.ready.set(1)
        logger.info(
            "bundle %s loaded and warm in %.1f s (model %s, providers %s)",
            self.settings.bundle_dir,
            time.monotonic() - self._load_started,
            scorer.model_version,
            scorer.providers_in_use,
        )
        if self.unavailable_providers and self.settings.providers is not None:
            logger.warning(
                "requested execution providers %s are unavailable; the graphs run on %s",
                self.unavailable_providers,
                scorer.providers_in_use,
            )

    async def stop(self) -> None:
        self.state = State.STOPPED
        self.metrics.ready.set(0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        if self.batcher is not None:
            # uvicorn has already let the in-flight requests finish; this answers whatever
            # an embedding server still had queued instead of failing it.
            await self.batcher.close(drain_timeout_s=DRAIN_TIMEOUT_S)
        for pool in (self._decode_pool, self._engine_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    async def wait_until_settled(self) -> State:
        """Wait for loading to finish either way (tests and benchmarks)."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        return self.state

    # -- readiness -----------------------------------------------------------------

    def require_ready(self) -> Scorer:
        """The scorer, or :class:`NotReady` saying why there is none."""
        if self.state is State.READY and self.scorer is not None:
            return self.scorer
        bundle = self.settings.bundle_dir
        if self.state is State.LOADING:
            elapsed = time.monotonic() - self._load_started
            raise NotReady(
                f"the model bundle is still loading from {bundle} (for {elapsed:.1f} s)",
                retry_after_s=self.settings.retry_after_s,
                extra={"state": self.state.value},
            )
        if self.state is State.FAILED:
            raise NotReady(
                f"the model bundle failed to load from {bundle}: {self.error}",
                retry_after_s=None,  # retrying will not help; the operator has to act
                extra={"state": self.state.value},
            )
        raise NotReady(
            "the service is shutting down",
            retry_after_s=self.settings.retry_after_s,
            extra={"state": self.state.value},
        )

    # -- scoring ---------------------------------------------------------------------

    async def score(self, uploads: Sequence[Upload], include_members: bool) -> list[dict[str, Any]]:
        """Decode, preprocess and score ``uploads``; one score object each, in order."""
        self.require_ready()
        assert self.batcher is not None and self._decode_pool is not None
        loop = asyncio.get_running_loop()
        async with self.batcher.admit(len(uploads)) as admission:
            decoded = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._decode_pool, decode_upload, upload, self.settings.max_image_pixels
                    )
                    for upload in uploads
                ),
                return_exceptions=True,
            )
            for outcome in decoded:  # the first bad image in request order is reported
                if isinstance(outcome, BaseException):
                    raise outcome
            images = np.stack(decoded)  # (n, 28, 28) uint8
            results = await admission.score(images, include_members)
        self.metrics.observe_results(results)
        return results
