"""The model-bundle format (DESIGN.md section 8): a folder the service loads with nothing else.

::

    models/<name>/
      manifest.json          version, provenance, feature order, threshold, members, files
      graphs/*.onnx          the scorer graphs the engine runs
      weights/member_<k>.*   torch weights (safetensors) and records, for retraining
      meta/heads.joblib      p_correct and p_ood meta classifiers, one pair per member
      report/                evaluation.json (GET /metrics), report.md, index.html, plots/

Every file except the manifest is listed in ``manifest["files"]`` with its SHA-256;
:func:`load_bundle` refuses a bundle in which any of them is missing or differs, and the
meta classifiers are unpickled only after that check.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scoring.features import feature_names

__all__ = [
    "BUNDLE_VERSION",
    "Bundle",
    "BundleError",
    "file_sha256",
    "load_bundle",
    "write_manifest",
]

#: Version of the folder layout and manifest keys; bumped on incompatible changes.
BUNDLE_VERSION = 1

MANIFEST_NAME = "manifest.json"
HEADS_PATH = "meta/heads.joblib"
REPORT_DIR = "report"
EVALUATION_PATH = "report/evaluation.json"


class BundleError(Exception):
    """A bundle is missing, incomplete, altered or from an incompatible version."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def graph_paths(self) -> list[Path]:
        return [self.path / relative for relative in self.manifest["graphs"]]

    @property
    def ood_threshold(self) -> float:
        return float(self.manifest["ood_threshold"])

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    def evaluation(self) -> dict[str, Any]:
        return json.loads((self.path / EVALUATION_PATH).read_text())

    def load_heads(self) -> dict[str, list]:
        """Unpickle the meta classifiers, re-checking their hash right before loading.

        joblib files can execute code when loaded, so only a file whose SHA-256 matches
        the manifest is ever opened.
        """
        import joblib

        path = self.path / self.manifest["heads"]
        expected = _expected_hashes(self.manifest)[self.manifest["heads"]]
        if file_sha256(path) != expected:
            raise BundleError(f"{path}: SHA-256 does not match the manifest; refusing to load it")
        heads = joblib.load(path)
        for name in ("p_correct", "p_ood"):
            if len(heads.get(name, [])) != len(self.manifest["members"]):
                raise BundleError(
                    f"{path}: expected one {name} head per member "
                    f"({len(self.manifest['members'])}), found {len(heads.get(name, []))}"
                )
        return heads


def _expected_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in manifest["files"]}


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle: version, feature order and the hash of every file."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: no bundle manifest here (is {path} a model bundle?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{manifest_path}: not valid JSON ({error})") from error
    version = manifest.get("bundle_version")
    if version != BUNDLE_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle_version {version!r}, this code reads {BUNDLE_VERSION}"
        )
    if manifest.get("feature_names") != feature_names():
        raise BundleError(
            f"{manifest_path}: the bundle's feature order differs from this code's; "
            "rebuild the bundle with this version"
        )
    for relative, expected in _expected_hashes(manifest).items():
        file_path = path / relative
        if not file_path.is_file():
            raise BundleError(f"{file_path}: listed in the manifest but missing")
        actual = file_sha256(file_path)
        if actual != expected:
            raise BundleError(
                f"{file_path}: SHA-256 {actual} does not match the manifest's {expected}"
            )
    listed = set(_expected_hashes(manifest))
    for required in [*manifest["graphs"], manifest["heads"], EVALUATION_PATH]:
        if required not in listed:
            raise BundleError(f"{manifest_path}: {required} is not among the hashed files")
    return Bundle(path=path, manifest=manifest)


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file below ``path`` into ``manifest["files"]`` and write manifest.json."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {
        **manifest,
        "bundle_version": BUNDLE_VERSION,
        "feature_names": feature_names(),
        "files": [
            {"path": p.relative_to(path).as_posix(), "sha256": file_sha256(p)} for p in files
        ],
    }
    (path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
