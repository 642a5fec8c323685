"""Property-based fuzzing of the HTTP API against its own OpenAPI schema (schemathesis).

The app is served by a real uvicorn server on loopback with the real bundle; schemathesis
reads /openapi.json from it and generates requests for every operation, valid ones and
invalid ones (negative mode). Every response must be no 5xx, carry a status code, a
Content-Type and a body that the schema declares for that operation. A second property
posts real images of random size, colour mode and format to both scoring endpoints: each
must be scored (and conform) or refused with a 4xx.

Bounded and reproducible: a fixed number of examples per operation and mode, no deadline,
derandomized. The number of cases run is printed and, if $GRADUNC_FUZZ_REPORT is set,
written there as JSON.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.main import create_app
from tools.harness import LoopbackServer, encode

EXAMPLES_PER_OPERATION = 40
IMAGE_EXAMPLES = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Raw image bodies of the formats schemathesis has no serializer for go out as they are.
schemathesis.serializer.alias(["image/bmp", "image/tiff"], "application/octet-stream")

#: Cases run, by "METHOD /path (mode)" and status code; written to $GRADUNC_FUZZ_REPORT.
CASES: Counter[str] = Counter()
STATUSES: dict[str, Counter[int]] = {}


@pytest.fixture(scope="module")
def server(bundle_dir: Path):
    app_settings = Settings(
        bundle_dir=bundle_dir,
        max_batch_images=8,
        queue_max=64,
        max_body_bytes=1_000_000,
        max_image_pixels=1_000_000,
    )
    with LoopbackServer(create_app(app_settings)) as running:
        running.wait_ready()
        yield running
    report = {
        "cases": sum(CASES.values()),
        "by_operation": dict(sorted(CASES.items())),
        "statuses": {key: dict(sorted(value.items())) for key, value in sorted(STATUSES.items())},
        "examples_per_operation_and_mode": EXAMPLES_PER_OPERATION,
        "schemathesis": schemathesis.__version__,
    }
    print("\nfuzz cases:", json.dumps(report, indent=2))
    if destination := os.environ.get("GRADUNC_FUZZ_REPORT"):
        Path(destination).write_text(json.dumps(report, indent=2) + "\n")


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as http:
        yield http


def _record(label: str, status: int) -> None:
    CASES[label] += 1
    STATUSES.setdefault(label, Counter())[status] += 1


def _operations(schema) -> list:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6, [op.label for op in operations]
    return operations


def _fuzz_operation(operation, label: str, mode: GenerationMode, base_url: str, session) -> None:
    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(base_url=base_url, session=session, timeout=60)
        _record(label, response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_to_the_schema(schema, server, session, mode) -> None:
    operations = _operations(schema)
    labels = {op.label for op in operations}
    assert {"POST /score", "POST /score/batch", "GET /readyz", "GET /metrics"} <= labels
    for operation in operations:
        has_input = any(
            len(group)
            for group in (
                operation.query,
                operation.body,
                operation.headers,
                operation.path_parameters,
            )
        )
        if mode is GenerationMode.NEGATIVE and not has_input:
            continue  # nothing to make invalid
        _fuzz_operation(operation, f"{operation.label} ({mode.value})", mode, server.url, session)
    # The schema is not vacuous: the fuzzing reached answers of every kind.
    statuses = Counter()
    for label, counts in STATUSES.items():
        if label.endswith(f"({mode.value})"):
            statuses.update(counts)
    assert statuses[200] > 0, statuses
    if mode is GenerationMode.NEGATIVE:
        assert any(400 <= status < 500 for status in statuses), statuses


# -- real images of every kind ---------------------------------------------------------

MODES = ["L", "RGB", "RGBA", "P", "1", "LA", "I;16", "I", "F", "CMYK"]
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"]


def encode_image(pixels: np.ndarray, mode: str, file_format: str) -> bytes:
    """``pixels`` (H, W) uint8 as a file of ``file_format``, converted to ``mode`` first
    (or to RGB where the format cannot store that mode)."""
    image = Image.fromarray(pixels, "L").convert(mode)
    try:
        return encode(image, file_format)
    except (OSError, ValueError, KeyError):
        return encode(image.convert("RGB"), file_format)


@st.composite
def image_files(draw) -> tuple[bytes, str]:
    """An image file: random size (1 to 300 px a side), colour mode, format and pixels."""
    width = draw(st.integers(1, 300))
    height = draw(st.integers(1, 300))
    mode = draw(st.sampled_from(MODES))
    file_format = draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 2**32 - 1))
    style = draw(st.sampled_from(["noise", "blank", "stroke"]))
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width), dtype=np.uint8)  # (H, W)
    if style == "noise":
        pixels = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    elif style == "stroke":
        pixels[:, width // 3 : max(width // 3 + 1, width // 2)] = 255
    return encode_image(pixels, mode, file_format), file_format


def test_every_colour_mode_in_every_format_is_scored(schema, server, session) -> None:
    """The sweep the random draws below may miss: each mode in each format, one batch each."""
    batch = schema["/score/batch"]["POST"]
    pixels = np.zeros((40, 30), dtype=np.uint8)  # (H, W): a bar, darker on a light ground
    pixels[5:35, 12:18] = 200
    for file_format in FORMATS:
        for start in range(0, len(MODES), 8):  # GRADUNC_MAX_BATCH_IMAGES is 8 here
            modes = MODES[start : start + 8]
            files = [encode_image(pixels, mode, file_format) for mode in modes]
            case = batch.Case(body={"images": files}, media_type="multipart/form-data")
            response = case.call(base_url=server.url, session=session, timeout=60)
            _record(f"POST /score/batch (every mode, {file_format})", response.status_code)
            case.validate_response(response, checks=CHECKS)
            assert response.status_code == 200, (file_format, modes, response.text)
            assert len(response.json()["results"]) == len(modes)


def test_real_images_of_every_kind_are_scored_or_refused_with_a_4xx(schema, server, session):
    single = schema["/score"]["POST"]
    batch = schema["/score/batch"]["POST"]

    @settings(
        max_examples=IMAGE_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(files=st.lists(image_files(), min_size=1, max_size=3), members=st.booleans())
    def check(files, members) -> None:
        data, file_format = files[0]
        case = single.Case(
            body={"image": data},
            media_type="multipart/form-data",
            query={"include_members": members},
        )
        response = case.call(base_url=server.url, session=session, timeout=60)
        _record(f"POST /score (images, {file_format})", response.status_code)
        case.validate_response(response, checks=CHECKS)
        assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
        raw = single.Case(
            body=data, media_type=f"image/{file_format.lower()}", query={"include_members": members}
        )
        response = raw.call(base_url=server.url, session=session, timeout=60)
        _record(f"POST /score (raw body, {file_format})", response.status_code)
        raw.validate_response(response, checks=CHECKS)
        many = batch.Case(body={"images": [d for d, _ in files]}, media_type="multipart/form-data")
        response = many.call(base_url=server.url, session=session, timeout=60)
        _record("POST /score/batch (images)", response.status_code)
        many.validate_response(response, checks=CHECKS)
        if response.status_code == 200:
            assert len(response.json()["results"]) == len(files)

    check()
    assert STATUSES["POST /score/batch (images)"][200] > 0, STATUSES
