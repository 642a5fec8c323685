"""The synthesized outliers (outlier exposure for the p_ood head), on real MNIST digits."""

from __future__ import annotations

import numpy as np
import pytest

from training.config import ConceptConfig
from training.data.synthesized import (
    DEFAULT_KINDS,
    MIRROR_CLASSES,
    SYNTHESIS_KINDS,
    synthesize_outliers,
)


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_test.images[:2000], mnist_test.labels[:2000]


def _parts(outliers: np.ndarray) -> list[np.ndarray]:
    part = len(outliers) // len(SYNTHESIS_KINDS)
    return [outliers[:part], outliers[part : 2 * part], outliers[2 * part :]]


def test_every_kind_gets_its_share_and_the_same_seed_gives_the_same_images(digits) -> None:
    images, labels = digits

    def make(seed: int) -> np.ndarray:
        return synthesize_outliers(images, labels, 1_501, seed=seed, kinds=SYNTHESIS_KINDS)

    outliers = make(3)
    assert outliers.shape == (1_501, 28, 28) and outliers.dtype == np.uint8
    assert [len(p) for p in _parts(outliers)] == [500, 500, 501]
    np.testing.assert_array_equal(outliers, make(3))
    assert not np.array_equal(outliers, make(4))


def test_the_default_kinds_are_the_configured_ones_and_reproduce_the_first_two(digits) -> None:
    """A default build uses overlay and tile shuffle only (the committed bundle's data);
    with the mirror added, those two stay the images they were, in fewer numbers."""
    images, labels = digits
    assert tuple(ConceptConfig().synthesis_kinds) == DEFAULT_KINDS == SYNTHESIS_KINDS[:2]
    default = synthesize_outliers(images, labels, 600, seed=5)
    assert len(default) == 600
    overlay = _parts(synthesize_outliers(images, labels, 900, seed=5, kinds=SYNTHESIS_KINDS))[0]
    np.testing.assert_array_equal(default[:300], overlay)


def test_overlays_hold_two_digits_and_tile_shuffles_keep_the_ink(digits) -> None:
    images, labels = digits
    overlay, shuffled, _ = _parts(
        synthesize_outliers(images, labels, 900, seed=0, kinds=SYNTHESIS_KINDS)
    )
    # The pixelwise maximum of two digits has more ink than a typical single digit.
    ink = lambda batch: (batch > 127).sum(axis=(1, 2))  # noqa: E731
    assert np.median(ink(overlay)) > 1.5 * np.median(ink(images))
    # A permutation of tiles moves pixels, never changes them: each shuffled image has the
    # pixel values of one real digit, and is not that digit.
    sources = {np.sort(a, axis=None).tobytes() for a in images}
    assert all(np.sort(s, axis=None).tobytes() in sources for s in shuffled)
    assert not {s.tobytes() for s in shuffled} & {a.tobytes() for a in images}


def test_mirrors_are_flipped_or_transposed_digits_of_asymmetric_classes_only(digits) -> None:
    images, labels = digits
    mirrored = _parts(synthesize_outliers(images, labels, 900, seed=1, kinds=SYNTHESIS_KINDS))[2]
    allowed = images[np.isin(labels, MIRROR_CLASSES)]
    flipped = {a[:, ::-1].tobytes() for a in allowed}
    transposed = {a.T.tobytes() for a in allowed}
    kinds = [
        "flip" if m.tobytes() in flipped else "transpose" if m.tobytes() in transposed else None
        for m in mirrored
    ]
    assert None not in kinds  # every one is a mirror image of an allowed digit
    assert 0.3 < kinds.count("flip") / len(kinds) < 0.7


def test_too_few_outliers_or_an_unknown_kind_is_refused(digits) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        synthesize_outliers(*digits, 2, seed=0, kinds=SYNTHESIS_KINDS)
    with pytest.raises(ValueError, match="'rotate'"):
        synthesize_outliers(*digits, 100, seed=0, kinds=("overlay", "rotate"))
