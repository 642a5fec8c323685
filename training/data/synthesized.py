"""Outliers made from in-distribution digits (outlier exposure) and re-framed glyphs.

Synthesized outliers keep the strokes, ink statistics and framing of real digits but are
no digit, so a p_ood head fitted on them learns more than "this is not noise". Each
transformation, applied to member-pool digits only (never calibration or test images):

- **overlay**: the pixelwise maximum of two digits of different classes, the second
  shifted by up to 4 pixels: two glyphs on top of each other;
- **tile shuffle**: the 28x28 image cut into a 4x4 grid of 7x7 tiles, the tiles
  permuted: strokes of a digit in an order no digit has;
- **mirror**: a digit of a class with no mirror symmetry (2, 3, 4, 5, 6, 7, 9) flipped
  left to right or transposed: handwritten strokes, framed like MNIST, in a shape no
  digit has, which is what a handwritten letter of another script looks like to the
  networks. (Turns by 180 degrees are left out: a turned 6 is a 9.)

:func:`reframe` turns 28x28 glyphs into the form a scanned character arrives in (dark ink
on a light page, larger, with a margin) and sends them through the service's own
preprocessing, which frames them like MNIST.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from scoring.preprocessing import prepare_array

__all__ = ["DEFAULT_KINDS", "MIRROR_CLASSES", "SYNTHESIS_KINDS", "reframe", "synthesize_outliers"]

#: The kinds a default build uses (``concepts.synthesis_kinds``). "mirror" is available but
#: off: with it (and p_ood chosen by its worst held-out concept) the default bundle's
#: p_ood lost 0.025 AUROC on Omniglot Latin and 0.008 on re-framed notMNIST.
DEFAULT_KINDS = ("overlay", "tile_shuffle")
#: Classes whose mirror images are no digit (0, 1 and 8 mirror into themselves).
MIRROR_CLASSES = (2, 3, 4, 5, 6, 7, 9)
#: Tile side of the tile shuffle: 28 = 4 x 7.
TILE = 7
#: Largest shift of the second digit of an overlay, in pixels.
MAX_SHIFT = 4


def _overlay(images: np.ndarray, labels: np.ndarray, count: int, rng) -> np.ndarray:
    first = rng.integers(0, len(images), size=count)
    out = np.empty((count, 28, 28), dtype=np.uint8)
    for i, a in enumerate(first):
        candidates = np.flatnonzero(labels != labels[a])
        b = candidates[rng.integers(0, len(candidates))]
        dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
        shifted = np.roll(images[b], (int(dy), int(dx)), axis=(0, 1))
        out[i] = np.maximum(images[a], shifted)
    return out


def _tile_shuffle(images: np.ndarray, labels: np.ndarray, count: int, rng) -> np.ndarray:
    chosen = images[rng.integers(0, len(images), size=count)]
    grid = 28 // TILE
    tiles = chosen.reshape(count, grid, TILE, grid, TILE).transpose(0, 1, 3, 2, 4)
    tiles = tiles.reshape(count, grid * grid, TILE, TILE)  # (N, 16, 7, 7)
    for i in range(count):
        tiles[i] = tiles[i][rng.permutation(grid * grid)]
    return (
        tiles.reshape(count, grid, grid, TILE, TILE).transpose(0, 1, 3, 2, 4).reshape(count, 28, 28)
    )


def _mirror(images: np.ndarray, labels: np.ndarray, count: int, rng) -> np.ndarray:
    candidates = np.flatnonzero(np.isin(labels, MIRROR_CLASSES))
    chosen = images[candidates[rng.integers(0, len(candidates), size=count)]]  # (N, 28, 28)
    transpose = rng.random(count) < 0.5
    return np.where(transpose[:, None, None], chosen.transpose(0, 2, 1), chosen[:, :, ::-1])


#: Each kind's maker: ``(images, labels, count, rng) -> (count, 28, 28)``.
_MAKERS = {"overlay": _overlay, "tile_shuffle": _tile_shuffle, "mirror": _mirror}
SYNTHESIS_KINDS = tuple(_MAKERS)


def synthesize_outliers(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    seed: int,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
) -> np.ndarray:
    """``count`` outliers from uint8 digits ``(N, 28, 28)``: the ``kinds`` (names of
    :data:`SYNTHESIS_KINDS`) in equal parts, in that order; the last takes the remainder."""
    unknown = [kind for kind in kinds if kind not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"synthesis kinds must be some of {list(SYNTHESIS_KINDS)}, got {kinds}")
    if count < len(kinds):
        raise ValueError(f"count must be at least {len(kinds)}, got {count}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    part = count // len(kinds)
    sizes = [part] * (len(kinds) - 1) + [count - part * (len(kinds) - 1)]
    return np.concatenate(
        [_MAKERS[kind](images, labels, size, rng) for kind, size in zip(kinds, sizes, strict=True)]
    ).astype(np.uint8)


def reframe(images: np.ndarray, scale: int = 4, margin: int = 16) -> np.ndarray:
    """28x28 white-on-black glyphs as scanned: enlarged, dark on light, with a margin,
    then through :func:`scoring.preprocessing.prepare_array` (MNIST framing)."""
    out = np.empty_like(images)
    side = 28 * scale
    for i, image in enumerate(images):
        large = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
        page = np.full((side + 2 * margin, side + 2 * margin), 255, dtype=np.uint8)
        page[margin : margin + side, margin : margin + side] = 255 - large
        out[i] = prepare_array(page)
    return out
