"""POST /feedback and request ids over real HTTP (uvicorn on loopback, the real bundle).

Every score object carries a fresh ``request_id``; feedback for it is matched, unknown
ids are reported, repeats are harmless, and a bad body is a 4xx problem+json that says
what is wrong. With recording off, or with a store that cannot be reached, scoring still
answers and feedback is refused with 503 (Retry-After only where retrying can help).
The images are noise: what is tested here does not depend on what they show.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config import Settings
from app.main import create_app
from tools.harness import LoopbackServer, png_bytes

PROBLEM_JSON = "application/problem+json"
MAX_ITEMS = 50


def noise_pngs(count: int, seed: int = 0) -> list[bytes]:
    generator = np.random.default_rng(seed)
    return [png_bytes(generator.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(count)]


def serve(bundle_dir: Path, **settings: Any) -> LoopbackServer:
    app = create_app(Settings(bundle_dir=bundle_dir, log_level="warning", **settings))
    return LoopbackServer(app)


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = tmp_path_factory.mktemp("feedback") / "live.sqlite3"
    with serve(
        bundle_dir, database_url=f"sqlite:///{database}", feedback_max_items=MAX_ITEMS
    ) as running:
        running.wait_ready()
        yield running.url


def score(url: str, pngs: list[bytes]) -> list[dict[str, Any]]:
    if len(pngs) == 1:
        response = httpx.post(url + "/score", files={"image": ("x.png", pngs[0], "image/png")})
        response.raise_for_status()
        return [response.json()]
    files = [("images", (f"{k}.png", png, "image/png")) for k, png in enumerate(pngs)]
    response = httpx.post(url + "/score/batch", files=files, timeout=60)
    response.raise_for_status()
    return response.json()["results"]


def feedback(url: str, items: list[dict[str, Any]], **headers: str) -> httpx.Response:
    return httpx.post(url + "/feedback", json={"items": items}, headers=headers, timeout=30)


def test_every_score_object_has_its_own_request_id(server: str) -> None:
    results = score(server, noise_pngs(1)) + score(server, noise_pngs(5, seed=1))
    results += score(server, noise_pngs(1))  # the same image again: a new answer, a new id
    ids = [result["request_id"] for result in results]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids) == 7
    ready = httpx.get(server + "/readyz").json()
    assert ready["store"]["status"] == "ok"
    assert ready["store"]["backend"] == "sqlite"


def test_feedback_is_matched_unknown_ids_are_named_and_repeats_are_harmless(server: str) -> None:
    first, second = score(server, noise_pngs(2, seed=2))
    items = [
        {"request_id": first["request_id"], "label": 3},
        {"request_id": second["request_id"], "label": None, "ood": True},
        {"request_id": "f" * 32, "label": 1},
    ]
    answer = feedback(server, items)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": 3, "matched": 2, "unknown": ["f" * 32]}
    again = feedback(server, items + items[:1])
    assert again.json() == {"received": 4, "matched": 3, "unknown": ["f" * 32]}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "detail"),
    [
        (b"label=3", "text/plain", 415, "Content-Type 'text/plain' is not accepted"),
        (b'{"items": [', "application/json", 422, "JSON decode error"),
        (b'{"items": []}', "application/json", 422, "List should have at least 1 item"),
        (b'{"items": [{"request_id": "a"}]}', None, 422, "label is required unless ood"),
        (
            b'{"items": [{"request_id": "a", "label": 2, "ood": true}]}',
            None,
            422,
            "label must be null when ood is true",
        ),
        (b'{"items": [{"request_id": "a", "label": -1}]}', None, 422, "greater than or equal"),
        (b'{"items": [{"request_id": "", "label": 1}]}', None, 422, "at least 1 character"),
        (
            b'{"items": [{"request_id": "' + b"a" * 65 + b'", "label": 1}]}',
            None,
            422,
            "at most 64 characters",
        ),
        (
            b'{"items": [{"request_id": "a", "label": 1, "image": "..."}]}',
            None,
            422,
            "Extra inputs are not permitted",
        ),
        (b'{"items": [{"request_id": "a", "label": "3"}]}', None, 422, "valid integer"),
        (b'{"items": [{"request_id": "a", "ood": "yes"}]}', None, 422, "valid boolean"),
        (b'{"items": [{"request_id": 17, "label": 1}]}', None, 422, "valid string"),
        # Not text at all (found by schemathesis): FastAPI's own 400, said plainly.
        (b"V\xff\xfe", None, 400, "JSON text encoded as UTF-8"),
    ],
)
def test_a_bad_body_is_a_4xx_that_says_what_is_wrong(
    server: str, body: bytes, content_type: str | None, status: int, detail: str
) -> None:
    response = httpx.post(
        server + "/feedback",
        content=body,
        headers={"Content-Type": content_type or "application/json"},
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert detail in response.json()["detail"]


def test_a_label_past_the_bundles_classes_is_refused(server: str, offline: Any) -> None:
    classes = getattr(offline, "class_names", None)
    if not classes:
        pytest.skip("this bundle does not name its classes")
    [result] = score(server, noise_pngs(1, seed=3))
    response = feedback(server, [{"request_id": result["request_id"], "label": len(classes)}])
    assert response.status_code == 422
    assert f"which has {len(classes)} (0 to {len(classes) - 1})" in response.json()["detail"]


def test_too_many_items_is_413_naming_the_limit(server: str) -> None:
    items = [{"request_id": f"id{k}", "label": 1} for k in range(MAX_ITEMS + 1)]
    response = feedback(server, items)
    assert response.status_code == 413
    problem = response.json()
    assert problem["limit"] == "GRADUNC_FEEDBACK_MAX_ITEMS"
    assert problem["limit_value"] == MAX_ITEMS
    assert f"{MAX_ITEMS + 1} feedback items" in problem["detail"]


def test_feedback_needs_the_api_key_when_one_is_set(bundle_dir: Path, tmp_path: Path) -> None:
    key = "k" * 24
    with serve(
        bundle_dir, database_url=f"sqlite:///{tmp_path / 'live.sqlite3'}", api_key=key
    ) as running:
        running.wait_ready()
        assert feedback(running.url, [{"request_id": "a", "label": 1}]).status_code == 401
        answer = feedback(
            running.url, [{"request_id": "a", "label": 1}], Authorization=f"Bearer {key}"
        )
        assert answer.status_code == 200
        assert answer.json()["unknown"] == ["a"]


def test_with_recording_off_scoring_works_and_feedback_is_refused(
    bundle_dir: Path, tmp_path: Path
) -> None:
    with serve(
        bundle_dir, database_url=f"sqlite:///{tmp_path / 'live.sqlite3'}", store_enabled=False
    ) as running:
        running.wait_ready()
        [result] = score(running.url, noise_pngs(1))
        assert result["request_id"]
        for response in (
            feedback(running.url, [{"request_id": result["request_id"], "label": 1}]),
            httpx.get(running.url + "/metrics/live"),
        ):
            assert response.status_code == 503
            assert "Retry-After" not in response.headers  # retrying cannot help
            assert "GRADUNC_STORE_ENABLED=false" in response.json()["detail"]
        assert httpx.get(running.url + "/readyz").json()["store"]["status"] == "disabled"
    assert not (tmp_path / "live.sqlite3").exists()


def test_an_unreachable_store_never_fails_scoring(
    bundle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the database's folder cannot be made under a file")
    caplog.set_level(logging.ERROR, logger="app.store")
    with serve(bundle_dir, database_url=f"sqlite:///{blocker / 'live.sqlite3'}") as running:
        running.wait_ready()
        results = score(running.url, noise_pngs(4))
        assert len({result["request_id"] for result in results}) == 4
        ready = httpx.get(running.url + "/readyz")
        assert ready.status_code == 200  # scoring is ready; the store is not
        store = ready.json()["store"]
        assert store["status"] == "degraded"
        assert store["pending_records"] == 4 and store["error"]
        for response in (
            feedback(running.url, [{"request_id": results[0]["request_id"], "label": 1}]),
            httpx.get(running.url + "/metrics/live"),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "1"
            assert response.json()["type"].endswith(":store-unavailable")
    assert any("is unreachable" in record.getMessage() for record in caplog.records)
    assert json.dumps(store).count(str(tmp_path)) == 0  # no path in the answer
