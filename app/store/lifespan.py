"""How an app gets its live store: a lifespan, a dependency, and recording served answers.

The store is started by the lifespan of the live-quality router (``app/routes/live.py``),
so an app that includes that router has ``app.state.store``; FastAPI runs the router's
lifespan inside the app's own. The same lifespan recomputes the live Prometheus gauges
every GRADUNC_LIVE_REFRESH_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from app.errors import ServiceUnavailable
from app.store.quality import fetch_window, live_report
from app.store.reference import ReferenceCache
from app.store.writer import LiveStore, StoreState, StoreUnavailable

__all__ = [
    "LiveStoreUnavailable",
    "StoreDep",
    "compute_live_report",
    "get_store",
    "new_request_id",
    "record_served",
    "store_lifespan",
]

logger = logging.getLogger(__name__)


def new_request_id() -> str:
    """An opaque id, unique per scored image: 32 hex digits of a random UUID."""
    return uuid.uuid4().hex


def record_served(request: Request, results: Sequence[MutableMapping[str, Any]]) -> None:
    """Give every score object its ``request_id`` and buffer it in the app's store."""
    for result in results:
        result["request_id"] = new_request_id()
    store: LiveStore | None = getattr(request.app.state, "store", None)
    if store is not None:
        store.record(results)


class LiveStoreUnavailable(ServiceUnavailable):
    """503: the live store cannot answer now (Retry-After unless retrying cannot help)."""

    problem = "store-unavailable"

    @classmethod
    def from_error(cls, error: StoreUnavailable, retry_after_s: int) -> LiveStoreUnavailable:
        return cls(error.reason, retry_after_s=retry_after_s if error.retryable else None)


async def get_store(request: Request) -> LiveStore:
    """The app's live store (async: FastAPI would run a plain function in its thread pool)."""
    store: LiveStore | None = getattr(request.app.state, "store", None)
    if store is None:  # only an app built without the live router, or not started
        raise LiveStoreUnavailable("the live store has not been started", retry_after_s=None)
    return store


StoreDep = Annotated[LiveStore, Depends(get_store)]


def compute_live_report(
    store: LiveStore,
    references: ReferenceCache,
    bundle_dir: Path,
    *,
    window_s: float,
    model_version: str | None,
) -> dict[str, Any]:
    """GET /metrics/live's body, read from the database (blocking: run it in a thread)."""
    if store.engine is None or store.state in (StoreState.DISABLED, StoreState.STOPPED):
        raise StoreUnavailable(
            "recording served answers is off (GRADUNC_STORE_ENABLED=false)"
            if store.state is StoreState.DISABLED
            else "the live store is not running",
            retryable=store.state is not StoreState.DISABLED,
        )
    if store.state is StoreState.STARTING:
        raise StoreUnavailable(f"the live store ({store.backend}) is still being set up")
    now = store.clock()
    with store.engine.connect() as connection:
        served, labelled = fetch_window(connection, now - window_s, model_version)
    return live_report(
        served,
        labelled,
        references.get(bundle_dir),
        window_s=window_s,
        now=now,
        model_version=model_version,
    )


def loaded_model_version(app: FastAPI) -> str | None:
    """The model version the service serves now (None while no bundle is loaded)."""
    scorer = getattr(getattr(app.state, "service", None), "scorer", None)
    return getattr(scorer, "model_version", None)


async def _refresh_gauges(app: FastAPI, store: LiveStore, references: ReferenceCache) -> None:
    settings = app.state.settings
    seen = -1
    while True:
        await asyncio.sleep(settings.live_refresh_s)
        # Reading the window costs CPU in the serving process: only when something changed.
        if store.state is not StoreState.OK or store.changes == seen:
            continue
        seen = store.changes
        try:
            report = await asyncio.to_thread(
                compute_live_report,
                store,
                references,
                settings.bundle_dir,
                window_s=settings.live_window_s,
                model_version=loaded_model_version(app),
            )
        except Exception as error:  # the store went away meanwhile: next time
            logger.debug("live gauges not refreshed: %r", error)
            continue
        app.state.metrics.live.observe(report, time.time())


@asynccontextmanager
async def store_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the store (its writer connects and migrates in the background), refresh the
    gauges while the app runs, and write what is buffered when it stops."""
    store = LiveStore.from_settings(app.state.settings, app.state.metrics.live)
    references = ReferenceCache()
    app.state.store = store
    app.state.live_references = references
    store.start()
    refresher = (
        asyncio.get_running_loop().create_task(
            _refresh_gauges(app, store, references), name="gradunc-live-gauges"
        )
        if store.enabled
        else None
    )
    try:
        yield
    finally:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await asyncio.to_thread(store.stop)
