"""The committed default bundle answers every official MNIST test image as it did when
its golden file was written (``python -m tools.golden_answers``).

This is the guard of refactors: moving code between modules must not move a number of
what the service serves. Predictions must be identical; probabilities and scores within
1e-5 (relative for the feature-space scores), head outputs within 1e-5 but for a handful
of images. Not tighter: onnxruntime's float32 kernels round differently on different
CPUs (about 3e-6 relative in the feature-space scores between two machines; ViM, a
difference of two such terms, relative to the terms).
"""

from __future__ import annotations

import numpy as np
import pytest

from tools.golden_answers import GOLDEN_PATH, golden_fields

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
#: Images whose head outputs may move past TOLERANCE from CPU rounding alone (of 10,000).
HEAD_ROUNDING_IMAGES = 10


@pytest.fixture(scope="module")
def golden(offline):
    with np.load(GOLDEN_PATH, allow_pickle=False) as stored:
        golden = {key: stored[key] for key in stored.files}
    if str(golden["model_version"]) != offline.model_version:
        pytest.fail(
            f"{GOLDEN_PATH.name} belongs to model {golden['model_version']}, the bundle is "
            f"{offline.model_version}: after rebuilding the default bundle, run "
            "`python -m tools.golden_answers` and commit the file"
        )
    return golden


@pytest.fixture(scope="module")
def answers(offline_mnist_test):
    return golden_fields(offline_mnist_test)


def test_every_mnist_test_image_gets_the_recorded_answer(golden, answers) -> None:
    assert len(answers["prediction"]) == 10_000
    np.testing.assert_array_equal(answers["prediction"], golden["prediction"])
    np.testing.assert_array_equal(answers["score_names"], golden["score_names"])
    np.testing.assert_allclose(answers["probabilities"], golden["probabilities"], atol=TOLERANCE)
    # feature-space distances run to the hundreds: relative there
    names = list(golden["score_names"])
    vim_column, energy_column = names.index("vim"), names.index("energy")
    others = [i for i in range(len(names)) if i != vim_column]
    np.testing.assert_allclose(
        answers["scores"][:, others], golden["scores"][:, others], rtol=TOLERANCE, atol=TOLERANCE
    )
    # ViM is energy minus the virtual logit, two terms of ~10 that cancel: its rounding
    # is relative to theirs, not to the (often small) difference.
    energy, vim = golden["scores"][:, energy_column], golden["scores"][:, vim_column]
    vim_moved = np.abs(answers["scores"][:, vim_column] - vim)
    vim_allowed = TOLERANCE * (1 + np.abs(energy) + np.abs(energy - vim))
    assert (vim_moved <= vim_allowed).all(), float(vim_moved.max())
    for field in ("p_correct", "p_ood"):
        moved = np.abs(answers[field] - golden[field]) > TOLERANCE
        # On another CPU a head input can round to the other side of one of the boosted
        # trees' split thresholds; a handful of such images is rounding, more is a change.
        assert moved.sum() <= HEAD_ROUNDING_IMAGES, (field, int(moved.sum()))
        assert np.abs(answers[field] - golden[field]).max() < 0.05, field
    assert (answers["is_ood"] != golden["is_ood"]).sum() <= HEAD_ROUNDING_IMAGES
