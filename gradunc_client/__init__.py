"""A small typed client of the gradient-uncertainty scoring service.

::

    from gradunc_client import ScoringClient

    with ScoringClient("http://127.0.0.1:8000") as client:
        score = client.score("examples/images/digit-7.png")      # a path, bytes or an array
        print(score["prediction"], score["p_correct"], score["p_ood"], score["is_ood"])

:class:`AsyncScoringClient` has the same methods for asyncio. Both retry a 503 that
carries ``Retry-After`` (still loading, queue full) and raise :class:`ScoringError`
with the service's problem detail otherwise. ``gradient-uncertainty score PATH...``
(:mod:`gradunc_client.cli`) scores files and folders from the command line.
"""

from __future__ import annotations

from gradunc_client._client import DEFAULT_URL, AsyncScoringClient, ScoringClient
from gradunc_client._errors import ScoringError, ServiceUnavailableError
from gradunc_client._images import ImageInput
from gradunc_client._types import BatchScores, FeedbackItem, GradientMetrics, Score

__all__ = [
    "DEFAULT_URL",
    "AsyncScoringClient",
    "BatchScores",
    "FeedbackItem",
    "GradientMetrics",
    "ImageInput",
    "Score",
    "ScoringClient",
    "ScoringError",
    "ServiceUnavailableError",
]
