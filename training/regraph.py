"""Re-export a bundle's scorer graphs with this code, keeping its answers.

``python -m training regraph --bundle-dir models/default``

When the scorer graph's code gets faster (``training/scorer_graph.py``) but computes the
same thing, a bundle need not be rebuilt (train, fit, evaluate: half an hour and more):
its graphs are exported again from its own member weights, each checked against the
float64 reference as a build checks it, and then the bundle's served answers are held
to what they were. Only when every answer is within :data:`ANSWER_TOLERANCE` of the old
one does the new bundle replace the old, so the heads, thresholds and report (all fitted
on the old graphs' outputs) stay valid, and ``model_version`` (what the answers are)
stays the same. Anything else is refused with the largest change, and nothing is
written: rebuild the bundle then.

The manifest records each new graph's export check with the code revision and time it
was exported; every file is hashed again. A signature (``manifest.sig``) no longer
matches the new manifest, so it is removed and the command says to sign again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scoring.bundle import MANIFEST_NAME, BundleError, load_bundle, write_manifest
from scoring.runtime import ImageScore, UncertaintyScorer
from scoring.signing import SIGNATURE_NAME

__all__ = ["ANSWER_TOLERANCE", "CHECK_IMAGES", "answer_changes", "regraph_bundle"]

#: Largest change of any probability in an answer (class probabilities, p_correct,
#: p_ood) a re-export may make; predictions and is_ood must not change at all. float32
#: summation order alone moves these by about 1e-8.
ANSWER_TOLERANCE = 1e-6
#: How many of the known concept's official test images check the graphs (the build
#: checks on the same 256, plus noise, an all-zero and a constant image).
CHECK_IMAGES = 256


def answer_changes(old: Sequence[ImageScore], new: Sequence[ImageScore]) -> dict[str, Any]:
    """How far ``new`` answers are from ``old`` ones, image by image.

    Returns the largest absolute change of the class probabilities, p_correct and p_ood,
    and how many predictions and is_ood flags differ.
    """
    if len(old) != len(new):
        raise ValueError(f"{len(old)} old answers against {len(new)} new ones")
    pairs = list(zip(old, new, strict=True))
    largest = {"probabilities": 0.0, "p_correct": 0.0, "p_ood": 0.0}
    for before, after in pairs:
        change = np.abs(np.subtract(before.probabilities, after.probabilities)).max()
        largest["probabilities"] = max(largest["probabilities"], float(change))
        largest["p_correct"] = max(largest["p_correct"], abs(before.p_correct - after.p_correct))
        largest["p_ood"] = max(largest["p_ood"], abs(before.p_ood - after.p_ood))
    return {
        "images": len(old),
        "largest_change": largest,
        "predictions_changed": sum(
            before.prediction != after.prediction for before, after in pairs
        ),
        "is_ood_changed": sum(before.is_ood != after.is_ood for before, after in pairs),
    }


def within_tolerance(changes: dict[str, Any], tolerance: float) -> bool:
    return (
        max(changes["largest_change"].values()) <= tolerance
        and changes["predictions_changed"] == 0
        and changes["is_ood_changed"] == 0
    )


def regraph_bundle(
    bundle_dir: Path,
    check_images: np.ndarray,
    *,
    tolerance: float = ANSWER_TOLERANCE,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Re-export the graphs of the bundle at ``bundle_dir`` in place; see the module docstring.

    Parameters
    ----------
    bundle_dir : Path
        A bundle with one graph per member and the members' weights (any bundle the
        builder wrote).
    check_images : ndarray of shape (N, 28, 28), uint8
        Real images of the known concept: the graphs are checked against the reference
        on them, and the answers compared on them, each time with seeded noise, an
        all-zero and a constant image added.
    tolerance : float
        :data:`ANSWER_TOLERANCE` unless given.

    Returns
    -------
    dict
        ``export_checks`` (as the manifest now records them), ``answers`` (see
        :func:`answer_changes`) and ``signature_removed``.

    Raises
    ------
    BundleError
        The bundle does not load, has another graph layout, or the new graphs would
        change its answers; the bundle is left as it was.
    """
    from training.bundle_builder import code_revision
    from training.scorer_graph import check_inputs, export_scorer_graph
    from training.train import load_member

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    if len(manifest.graphs) != len(manifest.members):
        raise BundleError(
            f"{bundle_dir}: {len(manifest.graphs)} graphs for {len(manifest.members)} members; "
            "regraph re-exports one graph per member"
        )
    staging = bundle_dir.with_name(f".{bundle_dir.name}.regraph")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(bundle_dir, staging, ignore=shutil.ignore_patterns(SIGNATURE_NAME))
    try:
        revision = code_revision()
        checks = []
        for member, relative in enumerate(manifest.graphs):
            model, _ = load_member(staging / "weights", member)
            check = export_scorer_graph(model, staging / relative, check_images)
            checks.append(
                {
                    **check,
                    "path": relative,
                    "code_revision": revision,
                    "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                }
            )
            ratio = check["worst"]["ratio"]
            log(f"member {member}: exported and checked (worst ratio {ratio:.3f})")
        write_manifest(staging, dataclasses.replace(manifest, export_checks=checks))
        probes = check_inputs(check_images)  # the digits, noise, all-zero and constant
        old_answers = UncertaintyScorer.from_bundle(bundle_dir).score(probes)
        new_answers = UncertaintyScorer.from_bundle(staging).score(probes)
        changes = answer_changes(old_answers, new_answers)
        if not within_tolerance(changes, tolerance):
            raise BundleError(
                f"{bundle_dir}: the re-exported graphs change the bundle's answers beyond "
                f"{tolerance:g} ({changes}); nothing was written. Rebuild the bundle "
                "(python -m training build) instead"
            )
        log(f"answers on {len(probes)} images: {changes['largest_change']} at most")
        signed = (bundle_dir / SIGNATURE_NAME).is_file()
        retired = bundle_dir.with_name(f".{bundle_dir.name}.before-regraph")
        if retired.exists():
            shutil.rmtree(retired)
        bundle_dir.rename(retired)
        staging.rename(bundle_dir)
        shutil.rmtree(retired)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if signed:
        log(
            f"{bundle_dir / SIGNATURE_NAME} was removed: it signed the old {MANIFEST_NAME}. "
            f"Sign again: python -m training sign {bundle_dir} --key KEY"
        )
    return {"export_checks": checks, "answers": changes, "signature_removed": signed}
