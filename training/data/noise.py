"""Uniform and normal noise images, the "no concept" sets, generated from a seed.

Generated at 28x28 and passed through ``prepare_array``, so the pipeline sees what the
service would see for a posted noise PNG (a 28x28 image is only inverted when its
border is light, which leaves the distribution of either noise unchanged).
"""

from __future__ import annotations

import hashlib

import numpy as np

from scoring.preprocessing import prepare_array
from training.data.base import Dataset, FileProvenance

#: A chosen default: the paper's count is lost; 1,000 is enough for stable AUROC estimates
#: and cheap to score. Callers pass ``count`` to change it.
DEFAULT_NOISE_COUNT = 1000
#: Normal noise is centred on mid-grey.
NORMAL_NOISE_MEAN = 127.5
#: A chosen default: 127.5 / 3, so 99.7% of values fall inside 0..255 and clipping
#: hardly changes the distribution.
NORMAL_NOISE_STD = 42.5
_SIDE = 28


def uniform_noise(count: int = DEFAULT_NOISE_COUNT, seed: int = 0) -> Dataset:
    """Pixels independent and uniform on 0..255."""
    _check_count(count)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(count, _SIDE, _SIDE), dtype=np.uint8)
    return _prepared("uniform-noise", raw, f"seed={seed}, count={count}")


def normal_noise(
    count: int = DEFAULT_NOISE_COUNT,
    seed: int = 0,
    *,
    mean: float = NORMAL_NOISE_MEAN,
    std: float = NORMAL_NOISE_STD,
) -> Dataset:
    """Pixels independent and normal (``mean``, ``std``), rounded and clipped to 0..255."""
    _check_count(count)
    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}")
    rng = np.random.default_rng(seed)
    values = rng.normal(mean, std, size=(count, _SIDE, _SIDE))
    raw = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return _prepared("normal-noise", raw, f"seed={seed}, count={count}, mean={mean}, std={std}")


def _check_count(count: int) -> None:
    if not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")


def _prepared(name: str, raw: np.ndarray, parameters: str) -> Dataset:
    images = np.stack([prepare_array(image) for image in raw])
    # Provenance of a generated set: its generator and parameters, and the hash of the
    # images, so a bundle records exactly what it was fitted on.
    digest = hashlib.sha256(images.tobytes()).hexdigest()
    provenance = FileProvenance(path=f"generated:{name}({parameters})", sha256=digest)
    return Dataset(name, images, None, [provenance])
