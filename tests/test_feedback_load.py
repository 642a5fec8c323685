"""The feedback load run (``tools.feedback_load``), small: on SQLite and on PostgreSQL.

64 images (MNIST test digits and notMNIST letters) at concurrency 8 against a real
service process; each client posts its image's feedback right after the answer. Asserted:
no error, every feedback item matched, the live counts equal the traffic, and the live
AUROC of every score on every comparison equals the one computed from the same answers
to 1e-9. The latency comparison runs briefly to prove it works; its figures are printed,
never judged. ``python -m tools.feedback_load`` is the full run (10,000 images, 32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_store import BACKENDS, database_url

from tools.feedback_load import AUROC_TOLERANCE, load_images, run_backend

IMAGES = 64
CONCURRENCY = 8


@pytest.fixture(scope="module")
def images(data_dir: Path):
    return load_images(IMAGES, ood_share=0.25, data_dir=data_dir)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_feedback_item_is_matched_and_live_auroc_equals_offline(
    backend: str, images, bundle_dir: Path, tmp_path: Path
) -> None:
    result = run_backend(
        backend,
        database_url(backend, tmp_path),
        images,
        concurrency=CONCURRENCY,
        bundle_dir=bundle_dir,
        work_dir=tmp_path,
        latency_rounds=4,
    )
    print(f"\nfeedback load ({backend}):", json.dumps(result.as_dict(), indent=2))
    assert result.problems == []
    assert result.score_errors == [] and result.feedback_errors == []
    assert (result.matched, result.unknown) == (IMAGES, 0)
    assert result.live_counts == result.expected_counts
    assert result.live_counts["labelled_ood"] == IMAGES // 4
    defined = [value for value in result.auroc_offline.values() if value is not None]
    assert len(defined) >= 8  # correct_vs_ood and correct_vs_rest at least
    assert result.max_auroc_difference is not None
    assert result.max_auroc_difference <= AUROC_TOLERANCE
    assert {"recording_on_median", "recording_off_median"} <= set(result.latency_ms)
