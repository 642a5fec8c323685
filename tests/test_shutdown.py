"""A request still running when uvicorn's graceful-shutdown timeout ends gets a 503.

A real uvicorn server on loopback, in a thread, with a route that never finishes; the
server is told to exit (what SIGTERM does) with a short graceful timeout, so uvicorn
cancels the request's task exactly as it does in production.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from app.errors import PROBLEM_JSON
from app.shutdown import ShutdownCancellationMiddleware


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _app(started: threading.Event) -> FastAPI:
    app = FastAPI()

    @app.get("/forever")
    async def forever() -> dict:
        started.set()
        await asyncio.sleep(3600)
        return {}

    @app.get("/quick")
    async def quick() -> dict:
        return {"ok": True}

    app.add_middleware(ShutdownCancellationMiddleware)
    return app


def _serve(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = _free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    return server, thread, port


def test_a_request_cut_off_by_the_shutdown_gets_a_503_problem():
    started = threading.Event()
    server, thread, port = _serve(_app(started))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/forever")
    assert started.wait(10)
    server.should_exit = True  # what uvicorn's SIGTERM handler does
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    thread.join(30)
    assert not thread.is_alive()
    assert response.status == 503
    assert response.getheader("Content-Type") == PROBLEM_JSON
    assert response.getheader("Retry-After") == "1"
    assert body["type"].endswith(":not-ready") and "shut down" in body["detail"]


def test_requests_that_finish_are_untouched():
    server, thread, port = _serve(_app(threading.Event()))
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/quick")
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"ok": True})
        connection.close()
    finally:
        server.should_exit = True
        thread.join(30)
