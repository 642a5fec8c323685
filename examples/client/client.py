"""An example application of the scoring service: read digits, trust only the sure ones.

It draws a few digits the way a scanned form shows them (dark ink on white, any size),
adds an image that is no digit at all, sends them to the service and decides per image:
accept the prediction, or hand the image to a person. Standard library and Pillow only.

    SCORER_URL=http://127.0.0.1:8000 python client.py
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import urllib.error
import urllib.request
import uuid
from typing import TextIO

from PIL import Image, ImageDraw

#: Accept a prediction only when the service thinks it is this likely to be right.
MIN_P_CORRECT = 0.9


def drawn_digit(strokes: list[list[tuple[int, int]]], size: tuple[int, int] = (240, 320)) -> bytes:
    """A PNG of dark polyline strokes on a white page."""
    page = Image.new("L", size, 255)
    pen = ImageDraw.Draw(page)
    for stroke in strokes:
        pen.line(stroke, fill=20, width=18, joint="curve")
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(seed: int = 0) -> bytes:
    rng = random.Random(seed)
    page = Image.frombytes("L", (64, 64), bytes(rng.randrange(256) for _ in range(64 * 64)))
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    return buffer.getvalue()


EXAMPLES = {
    "one": drawn_digit([[(120, 50), (120, 270)]]),
    "seven": drawn_digit([[(60, 60), (180, 60), (100, 270)]]),
    "zero": drawn_digit(
        [
            [
                (120, 50),
                (170, 90),
                (180, 160),
                (170, 230),
                (120, 270),
                (70, 230),
                (60, 160),
                (70, 90),
                (120, 50),
            ]
        ]
    ),
    "noise": noise_image(),
}


def multipart_body(field: str, files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = bytearray()
    for name, data in files.items():
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{name}.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


class ScorerError(RuntimeError):
    """The service answered with an error (its problem+json detail is the message)."""


def post(url: str, body: bytes, content_type: str, api_key: str | None) -> dict:
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # the service answers problem+json
        problem = json.load(error)
        raise ScorerError(
            f"{url}: {problem['status']} {problem['title']}: {problem['detail']}"
        ) from error


def decide(result: dict) -> str:
    if result["is_ood"]:
        return "not a digit the model knows: send to a person"
    if result["p_correct"] < MIN_P_CORRECT:
        return "unsure: send to a person"
    return f"accept {result['prediction']}"


def main(
    scorer_url: str | None = None, api_key: str | None = None, out: TextIO = sys.stdout
) -> int:
    scorer_url = (scorer_url or os.environ.get("SCORER_URL", "http://127.0.0.1:8000")).rstrip("/")
    api_key = api_key if api_key is not None else os.environ.get("GRADUNC_API_KEY") or None

    # One image as the raw request body...
    single = post(f"{scorer_url}/score", EXAMPLES["seven"], "image/png", api_key)
    print(f"POST /score (seven): prediction {single['prediction']}", file=out)

    # ...and all of them in one batch; results come back in the order sent.
    body, content_type = multipart_body("images", EXAMPLES)
    batch = post(f"{scorer_url}/score/batch", body, content_type, api_key)
    for name, result in zip(EXAMPLES, batch["results"], strict=True):
        print(
            f"{name:>6}: prediction {result['prediction']}  p_correct {result['p_correct']:.2f}"
            f"  p_ood {result['p_ood']:.2f}  -> {decide(result)}",
            file=out,
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ScorerError, urllib.error.URLError) as failure:
        sys.exit(f"example client: {failure}")
