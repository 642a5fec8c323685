"""The committed default bundle answers every official MNIST test image as it did when
its golden file was written (``python -m tools.golden_answers``).

This is the guard of refactors: moving code between modules must not move a number of
what the service serves. Predictions and ``is_ood`` must be identical; every float
within 1e-6 (relative for the feature-space scores), well below any number the report shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from tools.golden_answers import GOLDEN_PATH, golden_answers

pytestmark = pytest.mark.slow

TOLERANCE = 1e-6


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
def answers(offline, mnist_test):
    return golden_answers(offline, mnist_test.images)


def test_every_mnist_test_image_gets_the_recorded_answer(golden, answers) -> None:
    assert len(answers["prediction"]) == 10_000
    np.testing.assert_array_equal(answers["prediction"], golden["prediction"])
    np.testing.assert_array_equal(answers["is_ood"], golden["is_ood"])
    np.testing.assert_array_equal(answers["score_names"], golden["score_names"])
    for field in ("probabilities", "p_correct", "p_ood"):
        np.testing.assert_allclose(
            answers[field], golden[field], rtol=0, atol=TOLERANCE, err_msg=field
        )
    # feature-space distances run to the hundreds: relative there
    np.testing.assert_allclose(answers["scores"], golden["scores"], rtol=TOLERANCE, atol=TOLERANCE)
