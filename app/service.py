"""The data plane: loading the bundle, readiness, decoding and scoring, no HTTP.

:class:`ScoringService` loads the scorer in the background (so /healthz answers at once),
owns the two worker pools (one engine thread, a few decode threads) and the dynamic
batcher, and answers "not ready" with the reason until the scorer is loaded and warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from app.batching import DynamicBatcher
from app.config import Settings
from app.decoding import DecodeLimits, DecodePool
from app.errors import NotReady, PayloadTooLarge, ServiceError, UnprocessableContent
from app.metrics import ServiceMetrics
from scoring.preprocessing import ImageDecodeError, ImageTooLarge

if TYPE_CHECKING:  # onnxruntime is imported in the loading thread, not at start-up
    from scoring.runtime import ImageScore

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

    def score(self, images: np.ndarray, include_members: bool = False) -> list[ImageScore]: ...


ScorerLoader = Callable[[Settings], Scorer]


def load_bundle_scorer(settings: Settings) -> Scorer:
    """The real scorer: verify the bundle's signature (when GRADUNC_BUNDLE_PUBLIC_KEY is
    set) and hashes, then create the onnxruntime sessions."""
    # Imported here, in the loading thread: onnxruntime and the meta classifiers take a
    # while to import, and /healthz should answer while they do.
    from threadpoolctl import threadpool_limits

    from scoring.runtime import UncertaintyScorer
    from scoring.signing import require_signature

    # Process-wide and kept (not a context): the serving process runs no other OpenMP code.
    threadpool_limits(settings.head_threads, user_api="openmp")
    with require_signature(settings.bundle_public_key):  # checked by load_bundle, first
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


#: The setting behind each limit of ``scoring.preprocessing.prepare_files``.
_LIMIT_SETTINGS = {
    "max_pixels": "GRADUNC_MAX_IMAGE_PIXELS",
    "max_frames": "GRADUNC_MAX_IMAGE_FRAMES",
    "max_total_pixels": "GRADUNC_MAX_REQUEST_PIXELS",
}


def client_error(error: ImageDecodeError, uploads: Sequence[Upload]) -> ServiceError:
    """The 413 (a limit, named by its setting) or 422 for a file the decoder refused."""
    if error.index is not None and 0 <= error.index < len(uploads):
        label = uploads[error.index].label
    else:
        label = f"the request ({len(uploads)} image{'s' if len(uploads) != 1 else ''})"
    if isinstance(error, ImageTooLarge):
        variable = _LIMIT_SETTINGS.get(error.limit, error.limit)
        return PayloadTooLarge(
            f"{label}: {error.subject} is over the limit of {error.limit_value} {error.unit} "
            f"({variable})",
            limit=variable,
            limit_value=error.limit_value,
        )
    return UnprocessableContent(f"{label}: cannot decode the image: {error}")


def _warm_up_image() -> bytes:
    """A tiny PNG that readiness sends through the decode workers once."""
    buffer = BytesIO()
    Image.new("L", (28, 28), 0).save(buffer, format="PNG")
    return buffer.getvalue()


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
        self.decoder: DecodePool | None = None
        #: Execution providers asked for, and those of them no graph got (GET /readyz).
        self.requested_providers: list[str] = []
        self.unavailable_providers: list[str] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start loading the bundle in the background and return at once."""
        # One engine thread: onnxruntime parallelises inside a call, and sessions that run
        # side by side on few cores only fight each other (DESIGN.md section 7).
        self._engine_pool = ThreadPoolExecutor(1, thread_name_prefix="gradunc-engine")
        self.decoder = DecodePool(
            workers=self.settings.decode_workers,
            timeout_s=self.settings.decode_timeout_s,
            memory_bytes=self.settings.decode_memory_mb * 1024 * 1024,
            limits=DecodeLimits(
                max_pixels=self.settings.max_image_pixels,
                max_frames=self.settings.max_image_frames,
                max_total_pixels=self.settings.max_request_pixels,
            ),
        )
        self.decoder.start()
        self._load_started = time.monotonic()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="gradunc-load")

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            scorer = await loop.run_in_executor(self._engine_pool, self._loader, self.settings)
            await loop.run_in_executor(self._engine_pool, scorer.warm_up)
            assert self.decoder is not None
            await self.decoder.start_workers()
            await self.decoder.prepare([_warm_up_image()])  # one round trip before ready
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
        self.metrics.model_loaded(scorer.model_version, getattr(scorer, "ood_threshold", None))
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
        if self.decoder is not None:
            await self.decoder.stop()
        if self._engine_pool is not None:
            self._engine_pool.shutdown(wait=False, cancel_futures=True)
        # A stopped service answers nothing more: its engines and their arenas (about
        # 0.5 GB) go now, not when the last reference to the app goes. An app embedded in
        # a process that outlives it (tests, notebooks) would otherwise keep them.
        self.scorer, self.batcher = None, None

    async def wait_until_settled(self) -> State:
        """Wait for loading to finish either way (a Ray Serve replica's start-up, tests)."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        return self.state

    # -- readiness -----------------------------------------------------------------

    @property
    def bundle_name(self) -> str:
        """The bundle's folder name ("default"): what answers say instead of its path."""
        return self.settings.bundle_dir.resolve().name

    def bundle_relative(self, text: str) -> str:
        """``text`` with the bundle folder's path cut out of every file path it names
        (``graphs/member_0.onnx: ... missing``), so that no answer reveals where the
        service is installed."""
        given, resolved = str(self.settings.bundle_dir), str(self.settings.bundle_dir.resolve())
        for prefix in sorted({given, resolved}, key=len, reverse=True):
            if prefix not in (".", ""):
                text = text.replace(prefix + "/", "").replace(prefix, repr(self.bundle_name))
        return text

    def require_ready(self) -> Scorer:
        """The scorer, or :class:`NotReady` saying why there is none."""
        if self.state is State.READY and self.scorer is not None:
            return self.scorer
        bundle = repr(self.bundle_name)  # never the absolute path: it says too much
        if self.state is State.LOADING:
            elapsed = time.monotonic() - self._load_started
            raise NotReady(
                f"the model bundle is still loading from {bundle} (for {elapsed:.1f} s)",
                retry_after_s=self.settings.retry_after_s,
                extra={"state": self.state.value},
            )
        if self.state is State.FAILED:
            raise NotReady(
                f"the model bundle failed to load from {bundle}: "
                f"{self.bundle_relative(self.error or '')}",
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
        assert self.batcher is not None and self.decoder is not None
        async with self.batcher.admit(len(uploads)) as admission:
            try:
                images = await self.decoder.prepare([upload.data for upload in uploads])
            except ImageDecodeError as error:  # (n, 28, 28) uint8 above, or this
                raise client_error(error, uploads) from None
            scored = await admission.score(images, include_members)
        # The runtime's typed ImageScore becomes the response's score object here, once.
        results = [result.score_object() for result in scored]
        self.metrics.observe_results(results)
        return results
