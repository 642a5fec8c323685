"""/docs: Swagger UI from the installed package (no CDN), real examples, problem+json only.

The examples in app/openapi_examples.json must be what the app answers now for the
sample images and bad requests (regenerate with ``python -m app.openapi_examples
--write`` after rebuilding the bundle). The page is rendered by headless Chromium with
every host name but 127.0.0.1 unresolvable, and Chromium's own network log shows that
every request the page made went to the test server.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.errors import PROBLEM_JSON
from app.main import create_app
from app.openapi_examples import EXAMPLES_PATH, examples, generate
from tools.harness import LoopbackServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ERROR_STATUSES = {"400", "401", "404", "413", "415", "422", "503"}


@pytest.fixture(scope="module")
def server(bundle_dir: Path):
    with LoopbackServer(create_app(Settings(bundle_dir=bundle_dir))) as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def spec(server: LoopbackServer) -> dict[str, Any]:
    return httpx.get(server.url + "/openapi.json").json()


def operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        operation["operationId"]: operation
        for item in spec["paths"].values()
        for operation in item.values()
    }


def test_operation_ids_are_the_route_names(spec: dict[str, Any]) -> None:
    ids = set(operations(spec))
    assert {"score_image", "score_batch", "healthz", "readyz", "evaluation_metrics"} <= ids
    assert not [name for name in ids if re.search(r"_(get|post)$", name)], ids


def test_error_responses_are_problem_json_only_with_real_examples(spec: dict[str, Any]) -> None:
    for operation_id, operation in operations(spec).items():
        for status, response in operation["responses"].items():
            if status not in ERROR_STATUSES:
                continue
            assert list(response["content"]) == [PROBLEM_JSON], (operation_id, status)
    score_errors = operations(spec)["score_image"]["responses"]
    for status in ("400", "401", "413", "415", "422", "503"):
        media = score_errors[status]["content"][PROBLEM_JSON]
        values = [example["value"] for example in media["examples"].values()]
        assert values and all(value["status"] == int(status) for value in values), status
        assert all(value["detail"] and value["type"].startswith("urn:") for value in values)


def test_score_examples_are_real_score_objects(spec: dict[str, Any]) -> None:
    stored = examples()
    ok = operations(spec)["score_image"]["responses"]["200"]["content"]["application/json"]
    [example] = ok["examples"].values()
    assert example["value"] == stored["score"]
    assert "digit-7.png" in example["summary"]
    batch = operations(spec)["score_batch"]["responses"]["200"]["content"]["application/json"]
    [batch_example] = batch["examples"].values()
    assert [r["prediction"] for r in batch_example["value"]["results"]][0] == 7


def _same(stored: Any, served: Any, where: str = "") -> None:
    """Equal, floats to 1e-5 relative (or 1e-6 absolute); ids and paths that differ per
    run are skipped. onnxruntime's float32 kernels round differently on different CPUs
    (about 3e-6 relative was seen in the feature-space scores between two machines)."""
    if isinstance(stored, dict):
        assert isinstance(served, dict) and stored.keys() == served.keys(), where
        for key in stored:
            if key != "request_id":
                _same(stored[key], served[key], f"{where}.{key}")
    elif isinstance(stored, list):
        assert isinstance(served, list) and len(stored) == len(served), where
        for index, (a, b) in enumerate(zip(stored, served, strict=True)):
            _same(a, b, f"{where}[{index}]")
    elif isinstance(stored, float):
        assert served == pytest.approx(stored, rel=1e-5, abs=1e-6), where
    else:
        assert stored == served, where


def test_stored_examples_are_what_the_app_answers_now(bundle_dir: Path) -> None:
    default = Path(Settings().bundle_dir)
    if bundle_dir.resolve() != default.resolve():
        pytest.skip(f"the examples are of the default bundle, not of {bundle_dir}")
    fresh = generate()
    stored = json.loads(EXAMPLES_PATH.read_text())
    try:
        _same(stored, fresh)
    except AssertionError as error:
        raise AssertionError(
            f"{EXAMPLES_PATH.name} is stale at {error}; run `python -m app.openapi_examples "
            "--write` (after rebuilding the default bundle)"
        ) from None


def test_root_redirects_to_docs_and_assets_come_from_the_package(server: LoopbackServer) -> None:
    root = httpx.get(server.url + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/docs"
    page = httpx.get(server.url + "/docs").text
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert referenced and all(url.startswith("/docs/assets/") for url in referenced), referenced
    assert "http://" not in page and "https://" not in page
    import fastapi_offline

    shipped = Path(fastapi_offline.__file__).parent / "static" / "swagger-ui-bundle.js"
    served = httpx.get(server.url + "/docs/assets/swagger-ui-bundle.js")
    assert served.status_code == 200 and served.content == shipped.read_bytes()


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is absent (apt: chromium)")
def test_docs_render_offline_in_headless_chromium(server: LoopbackServer, tmp_path: Path) -> None:
    net_log = tmp_path / "netlog.json"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        # No name resolves but loopback: a CDN asset could not load even with a network.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--log-net-log={net_log}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        # Deep link: Swagger UI opens the operation, so its example response is rendered.
        server.url + "/docs#/scoring/score_image",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    text = html.unescape(re.sub(r"<[^>]+>", "", result.stdout))
    assert "Gradient uncertainty scoring service" in text
    assert "score_image" in text
    score = examples()["score"]
    assert "examples/images/digit-7.png, scored by the default bundle" in text
    assert json.dumps(score["p_ood"]) in text  # the example's own number, rendered
    problem = examples()["problems"]["400"]["no-boundary"]["value"]["detail"]
    assert problem in text

    # What the page itself requested (its network isolation key is the server's site).
    log = json.loads(net_log.read_text())
    event_types = {value: name for name, value in log["constants"]["logEventTypes"].items()}
    page_requests = [
        event["params"]["url"]
        for event in log["events"]
        if event_types.get(event["type"]) == "URL_REQUEST_START_JOB"
        and event.get("params", {}).get("network_isolation_key", "").startswith("http://127.0.0.1")
    ]
    assert server.url + "/docs/assets/swagger-ui-bundle.js" in page_requests
    assert server.url + "/openapi.json" in page_requests
    strays = [url for url in page_requests if not url.startswith(server.url + "/")]
    assert not strays, strays
