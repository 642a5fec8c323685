"""The calibration split's score distributions stored in the bundle: what drift compares to.

``reference/calibration_scores.json`` holds ``{"p_ood": [...], "p_correct": [...],
"softmax_baseline": [...]}``, the served scores of the calibration images (floats). It is
read only when the manifest lists it and its SHA-256 matches, like every bundle file. A
bundle built before the file existed simply has no drift reference: every drift figure
is then null with that reason, and nothing else changes. (A manifest may name the file
under its ``reference`` key; the default path is used otherwise.)
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scoring.bundle import MANIFEST_NAME, REFERENCE_PATH, file_sha256

__all__ = ["DRIFT_SCORES", "REFERENCE_PATH", "CalibrationReference", "ReferenceCache"]

#: The served distributions compared with the calibration split's.
DRIFT_SCORES: tuple[str, ...] = ("p_ood", "p_correct", "softmax_baseline")


@dataclass(frozen=True)
class CalibrationReference:
    """Reference values per score; ``problems`` says why a score (or all) has none."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    unavailable: str | None = None  # why the whole reference is missing

    def reason(self, score: str) -> str | None:
        """Why there is no reference for ``score``, or None when there is one."""
        return self.unavailable or self.problems.get(score)

    @classmethod
    def load(cls, bundle_dir: Path) -> CalibrationReference:
        manifest_path = bundle_dir / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            return cls(unavailable=f"cannot read the bundle's {MANIFEST_NAME}: {error}")
        relative = manifest.get("reference") or REFERENCE_PATH
        expected = {
            entry.get("path"): entry.get("sha256") for entry in manifest.get("files", [])
        }.get(relative)
        path = bundle_dir / relative
        if expected is None:
            return cls(
                unavailable=f"the loaded bundle has no {relative} in its "
                "manifest (built before calibration score references were stored); "
                "rebuild it to get drift figures"
            )
        if not path.is_file():
            return cls(unavailable=f"the bundle's {relative} is listed in the manifest but missing")
        if file_sha256(path) != expected:
            return cls(unavailable=f"the bundle's {relative}: SHA-256 does not match the manifest")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            return cls(unavailable=f"the bundle's {relative} is not valid JSON ({error})")
        if not isinstance(data, dict):
            return cls(
                unavailable=f"the bundle's {relative} holds {type(data).__name__}, expected an "
                "object"
            )
        values: dict[str, np.ndarray] = {}
        problems: dict[str, str] = {}
        for score in DRIFT_SCORES:
            raw = data.get(score)
            if not isinstance(raw, list) or not raw:
                problems[score] = f"the bundle's {relative} has no non-empty list {score!r}"
            elif not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in raw
            ):
                problems[score] = (
                    f"the bundle's {relative}: {score!r} holds values that are not finite numbers"
                )
            else:
                values[score] = np.asarray(raw, dtype=np.float64)
        return cls(values=values, problems=problems)


class ReferenceCache:
    """The reference of a bundle folder, re-read only when its manifest changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int] | None = None
        self._reference: CalibrationReference | None = None

    def get(self, bundle_dir: Path) -> CalibrationReference:
        try:
            stamp = (bundle_dir / MANIFEST_NAME).stat().st_mtime_ns
        except OSError:
            stamp = -1
        key = (str(bundle_dir.resolve()), stamp)
        with self._lock:
            if self._key != key or self._reference is None:
                self._reference = CalibrationReference.load(bundle_dir)
                self._key = key
            return self._reference
