"""An example application of the scoring service: read digits, trust only the sure ones.

It draws a few digits the way a scanned form shows them (dark ink on white, any size),
adds an image that is no digit at all, sends them to the service with the project's
client (``gradunc_client``) and decides per image: accept the prediction, or hand the
image to a person.

    SCORER_URL=http://127.0.0.1:8000 python examples/client/client.py
"""

from __future__ import annotations

import io
import os
import random
import sys
from typing import TextIO

import httpx
from PIL import Image, ImageDraw

from gradunc_client import Score, ScoringClient, ScoringError

#: Accept a prediction only when the service thinks it is this likely to be right.
MIN_P_CORRECT = 0.9

#: The client's error: the service's problem+json as "<status> <title>: <detail>".
ScorerError = ScoringError


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


def decide(result: Score) -> str:
    if result["is_ood"]:
        return "not a digit the model knows: send to a person"
    if result["p_correct"] < MIN_P_CORRECT:
        return "unsure: send to a person"
    return f"accept {result['prediction']}"


def main(
    scorer_url: str | None = None, api_key: str | None = None, out: TextIO = sys.stdout
) -> int:
    scorer_url = scorer_url or os.environ.get("SCORER_URL", "http://127.0.0.1:8000")
    api_key = api_key if api_key is not None else os.environ.get("GRADUNC_API_KEY") or None

    with ScoringClient(scorer_url, api_key=api_key) as client:
        # One image (the client posts it as the multipart part 'image')...
        single = client.score(EXAMPLES["seven"], name="seven.png")
        print(f"POST /score (seven): prediction {single['prediction']}", file=out)

        # ...and all of them in one batch; results come back in the order sent.
        names = list(EXAMPLES)
        batch = client.score_batch(
            [EXAMPLES[name] for name in names], names=[f"{name}.png" for name in names]
        )
    for name, result in zip(names, batch, strict=True):
        print(
            f"{name:>6}: prediction {result['prediction']}  p_correct {result['p_correct']:.2f}"
            f"  p_ood {result['p_ood']:.2f}  -> {decide(result)}",
            file=out,
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ScoringError, httpx.HTTPError) as failure:
        sys.exit(f"example client: {failure}")
