"""Real examples for /docs: what the service answered for the sample images and bad requests.

``openapi_examples.json`` beside this module holds answers of the real app (the committed
default bundle, default settings) to the requests in :func:`generate`: a score object
for ``examples/images/digit-7.png``, a batch with that digit and the notMNIST letter
``letter-h.png``, and one problem+json answer per documented error status. They are
written by this module, never by hand, and ``tests/test_docs.py`` fails when they differ
from what the app answers now; after rebuilding the default bundle, run::

    python -m app.openapi_examples --write

The routes reference them through :func:`score_example_response` and friends, and
``app.routes._docs.problem_responses`` attaches the problem examples to every error.
"""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "EXAMPLES_PATH",
    "batch_example_response",
    "examples",
    "generate",
    "problem_examples",
    "score_example_response",
]

EXAMPLES_PATH = Path(__file__).resolve().with_name("openapi_examples.json")
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "examples" / "images"
#: The samples the score examples are made from.
SCORE_SAMPLE = "digit-7.png"
BATCH_SAMPLES = ("digit-7.png", "letter-h.png")


@lru_cache
def examples() -> dict[str, Any]:
    """The stored examples; empty ones when the file is absent (docs without examples)."""
    try:
        return json.loads(EXAMPLES_PATH.read_text())
    except FileNotFoundError:
        return {"score": None, "batch": None, "problems": {}}


def _json_example(summary: str, value: Any) -> dict[str, Any]:
    return {
        "content": {
            "application/json": {"examples": {"sample": {"summary": summary, "value": value}}}
        }
    }


def score_example_response() -> dict[str, Any]:
    """``responses={200: ...}`` entry of POST /score with the real score object."""
    value = examples()["score"]
    if value is None:
        return {}
    return _json_example(f"examples/images/{SCORE_SAMPLE}, scored by the default bundle", value)


def batch_example_response() -> dict[str, Any]:
    """``responses={200: ...}`` entry of POST /score/batch with a real batch answer."""
    value = examples()["batch"]
    if value is None:
        return {}
    names = " and ".join(f"examples/images/{name}" for name in BATCH_SAMPLES)
    return _json_example(f"{names}, scored by the default bundle", value)


def problem_examples(status_code: int) -> dict[str, dict[str, Any]]:
    """OpenAPI ``examples`` of problem+json answers with this status, by name."""
    return dict(examples()["problems"].get(str(status_code), {}))


# -- generating them with the real app ---------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` with one empty data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _problem(response: Any, status: int, summary: str) -> tuple[str, dict[str, Any]]:
    if response.status_code != status:
        raise RuntimeError(f"expected {status} for {summary!r}, got {response.status_code}")
    if not response.headers["content-type"].startswith("application/problem+json"):
        raise RuntimeError(f"{summary!r}: not problem+json: {response.headers['content-type']}")
    return summary, response.json()


def generate() -> dict[str, Any]:
    """Ask the real app (default bundle, default settings) for every example."""
    import warnings

    with warnings.catch_warnings():  # Starlette's note on httpx vs httpx2 for TestClient
        warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
        from fastapi.testclient import TestClient

    from fastapi import FastAPI

    from app.config import Settings
    from app.main import create_app

    def client(**settings: Any) -> TestClient:
        return TestClient(create_app(Settings(**settings)), raise_server_exceptions=True)

    def wait_ready(test_client: TestClient) -> None:
        app = test_client.app
        assert isinstance(app, FastAPI) and test_client.portal is not None  # inside `with`
        test_client.portal.call(app.state.service.wait_until_settled)

    sample = (SAMPLES / SCORE_SAMPLE).read_bytes()
    problems: dict[str, dict[str, dict[str, Any]]] = {}

    def add(status: int, name: str, pair: tuple[str, dict[str, Any]]) -> None:
        summary, value = pair
        problems.setdefault(str(status), {})[name] = {"summary": summary, "value": value}

    with client() as app_client:
        wait_ready(app_client)
        score = app_client.post("/score", content=sample, headers={"content-type": "image/png"})
        score.raise_for_status()
        files = [("images", (name, (SAMPLES / name).read_bytes())) for name in BATCH_SAMPLES]
        batch = app_client.post("/score/batch", files=files)
        batch.raise_for_status()
        add(
            400,
            "no-boundary",
            _problem(
                app_client.post(
                    "/score", content=b"x", headers={"content-type": "multipart/form-data"}
                ),
                400,
                "multipart/form-data without a boundary",
            ),
        )
        add(
            413,
            "too-many-pixels",
            _problem(
                app_client.post(
                    "/score", files={"image": ("huge.png", _png_claiming(100_000, 100_000))}
                ),
                413,
                "a PNG claiming 100000x100000 pixels",
            ),
        )
        add(
            415,
            "wrong-content-type",
            _problem(
                app_client.post("/score", content=b"hello", headers={"content-type": "text/plain"}),
                415,
                "a text/plain body",
            ),
        )
        add(
            422,
            "wrong-part-name",
            _problem(
                app_client.post("/score", files={"file": ("digit.png", sample)}),
                422,
                "the image sent as a part named 'file'",
            ),
        )
        add(
            422,
            "not-an-image",
            _problem(
                app_client.post("/score", files={"image": ("notes.txt", b"not an image\n")}),
                422,
                "a text file sent as the image",
            ),
        )
    with client(api_key="example-key-0123456789") as app_client:
        add(
            401,
            "missing-key",
            _problem(
                app_client.post("/score", content=sample, headers={"content-type": "image/png"}),
                401,
                "no Authorization header while GRADUNC_API_KEY is set",
            ),
        )
    with client(bundle_dir=Path("models/missing")) as app_client:
        wait_ready(app_client)
        add(
            503,
            "bundle-failed",
            _problem(app_client.get("/readyz"), 503, "GRADUNC_BUNDLE_DIR names no bundle"),
        )
    return {
        "_comment": "Written by `python -m app.openapi_examples --write`; do not edit by hand.",
        "score": score.json(),
        "batch": batch.json(),
        "problems": {status: problems[status] for status in sorted(problems)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate or check the /docs examples.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"write {EXAMPLES_PATH.name}")
    action.add_argument("--print", action="store_true", help="print them instead")
    arguments = parser.parse_args(argv)
    text = json.dumps(generate(), indent=1) + "\n"
    if arguments.write:
        EXAMPLES_PATH.write_text(text)
        print(f"wrote {EXAMPLES_PATH}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
