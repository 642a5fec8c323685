"""The model-bundle format (DESIGN.md section 8): a folder the service loads with nothing else.

::

    models/<name>/
      manifest.json              BundleManifest: version, configuration, provenance, files
      graphs/*.onnx              the scorer graphs the engine runs
      feature_space/member_<k>.npz  what the feature-space scores need, per member
      weights/member_<k>.*       torch weights (safetensors) and records, for retraining
      meta/heads.joblib          the p_correct and p_ood heads on ensemble inputs
      reference/calibration_scores.json  served p_ood, p_correct and softmax baseline of
                                 the calibration split (the drift reference)
      report/                    evaluation.json (GET /metrics), report.md, index.html, plots/

Every file except the manifest is listed in ``manifest.files`` with its SHA-256;
:func:`load_bundle` refuses a bundle in which any of them is missing or differs, and the
heads are unpickled only after that check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scoring.features import feature_names

__all__ = [
    "BUNDLE_VERSION",
    "Bundle",
    "BundleError",
    "BundleManifest",
    "file_sha256",
    "load_bundle",
    "write_manifest",
]

#: Version of the folder layout and manifest keys; bumped on incompatible changes.
#: 2: ensemble-level heads, feature-space statistics, class names, the drift reference.
#: 3: the scorer graphs emit channel statistics; the channel Mahalanobis statistics.
BUNDLE_VERSION = 3

MANIFEST_NAME = "manifest.json"
HEADS_PATH = "meta/heads.joblib"
FEATURE_SPACE_DIR = "feature_space"
REFERENCE_PATH = "reference/calibration_scores.json"
REPORT_DIR = "report"
EVALUATION_PATH = "report/evaluation.json"
#: Mode of every file the builder writes: readable by a container's non-root user.
FILE_MODE = 0o644
FOLDER_MODE = 0o755


class BundleError(Exception):
    """A bundle is missing, incomplete, altered or from an incompatible version."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class BundleManifest:
    """What ``manifest.json`` holds; the builder writes it and the loader validates it."""

    name: str
    model_version: str
    created_at: str
    code_revision: str
    config: dict[str, Any]  # the whole configuration tree of the build
    data_provenance: dict[str, list[dict]]
    class_names: list[str]
    graphs: list[str]
    feature_space: list[str]  # one .npz per member, in member order
    heads: str
    heads_orientation: dict[str, str]
    head_inputs: list[str]
    ood_threshold: float
    ood_threshold_rule: dict[str, Any]
    head_selection: dict[str, Any]
    reference: str
    members: list[dict[str, Any]]
    export_checks: list[dict[str, Any]]
    build_seconds: dict[str, float]
    bundle_version: int = BUNDLE_VERSION
    feature_names: list[str] = field(default_factory=feature_names)
    files: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Path) -> BundleManifest:
        """Validate keys and types; errors name the file and the key."""
        if not isinstance(values, dict):
            raise BundleError(f"{source}: the manifest must be a JSON object")
        version = values.get("bundle_version")
        if version != BUNDLE_VERSION:
            raise BundleError(
                f"{source}: bundle_version {version!r}, this code reads {BUNDLE_VERSION}; "
                "rebuild the bundle with this version"
            )
        kwargs = {}
        for item in dataclasses.fields(cls):
            if item.name not in values:
                raise BundleError(f"{source}: the manifest has no {item.name!r} key")
            kwargs[item.name] = values[item.name]
        expected_types = {
            "graphs": list,
            "feature_space": list,
            "class_names": list,
            "members": list,
            "files": list,
            "head_inputs": list,
            "heads": str,
            "model_version": str,
            "reference": str,
        }
        for key, kind in expected_types.items():
            if not isinstance(kwargs[key], kind):
                raise BundleError(
                    f"{source}: manifest key {key!r} must be a {kind.__name__}, "
                    f"got {type(kwargs[key]).__name__}"
                )
        if not isinstance(kwargs["ood_threshold"], int | float):
            raise BundleError(f"{source}: manifest key 'ood_threshold' must be a number")
        for entry in kwargs["files"]:
            if not (isinstance(entry, dict) and {"path", "sha256"} <= set(entry)):
                raise BundleError(f"{source}: every 'files' entry needs 'path' and 'sha256'")
        if len(kwargs["feature_space"]) != len(kwargs["members"]):
            raise BundleError(
                f"{source}: {len(kwargs['feature_space'])} feature_space files for "
                f"{len(kwargs['members'])} members"
            )
        return cls(**kwargs)

    @property
    def hashes(self) -> dict[str, str]:
        return {entry["path"]: entry["sha256"] for entry in self.files}


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its folder and its manifest."""

    path: Path
    manifest: BundleManifest

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def graph_paths(self) -> list[Path]:
        return [self.path / relative for relative in self.manifest.graphs]

    @property
    def ood_threshold(self) -> float:
        return float(self.manifest.ood_threshold)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    @property
    def reference_path(self) -> Path:
        """The calibration split's served scores (the drift reference)."""
        return self.path / self.manifest.reference

    def evaluation(self) -> dict[str, Any]:
        return json.loads((self.path / EVALUATION_PATH).read_text())

    def _verified(self, relative: str) -> Path:
        """A listed file whose hash is re-checked right before it is read."""
        path = self.path / relative
        if file_sha256(path) != self.manifest.hashes.get(relative):
            raise BundleError(f"{path}: SHA-256 does not match the manifest; refusing to load it")
        return path

    def load_feature_space(self) -> list:
        """Each member's :class:`~scoring.scores.FeatureSpaceStatistics`, in member order."""
        from scoring.scores import FeatureSpaceStatistics

        return [
            FeatureSpaceStatistics.load(self._verified(relative))
            for relative in self.manifest.feature_space
        ]

    def load_heads(self):
        """Unpickle the heads (:class:`~scoring.answer.Heads`), re-checking their hash
        first, with their compiled forms (:mod:`scoring.compiled_heads`).

        joblib files can execute code when loaded, so only a file whose SHA-256 matches
        the manifest is ever opened.
        """
        import joblib

        from scoring.answer import Heads

        path = self._verified(self.manifest.heads)
        stored = joblib.load(path)
        missing = {"p_correct", "p_ood", "ood_threshold", "input_names"} - set(stored)
        if missing:
            raise BundleError(f"{path}: the heads file lacks {sorted(missing)}")
        heads = Heads(
            p_correct=stored["p_correct"],
            p_ood=stored["p_ood"],
            ood_threshold=float(stored["ood_threshold"]),
            input_names=list(stored["input_names"]),
        )
        try:
            heads.check()
        except ValueError as error:
            raise BundleError(f"{path}: {error}") from error
        return heads.with_compiled_forms()


def load_bundle(path: str | Path, *, public_key: Path | None = None) -> Bundle:
    """Read and verify a bundle: version, keys, feature order and the hash of every file.

    With ``public_key`` (or one set by ``scoring.signing.require_signature``) the
    manifest's Ed25519 signature is checked first, over the bytes that are then parsed.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: no bundle manifest here (is {path} a model bundle?)")
    manifest_bytes = manifest_path.read_bytes()
    from scoring.signing import check_signature  # here: signing imports this module

    check_signature(path, manifest_bytes, public_key)
    try:
        values = json.loads(manifest_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path}: not valid JSON ({error})") from error
    manifest = BundleManifest.from_dict(values, manifest_path)
    if manifest.feature_names != feature_names():
        raise BundleError(
            f"{manifest_path}: the bundle's feature order differs from this code's; "
            "rebuild the bundle with this version"
        )
    for relative, expected in manifest.hashes.items():
        file_path = path / relative
        if not file_path.is_file():
            raise BundleError(f"{file_path}: listed in the manifest but missing")
        actual = file_sha256(file_path)
        if actual != expected:
            raise BundleError(
                f"{file_path}: SHA-256 {actual} does not match the manifest's {expected}"
            )
    required = [
        *manifest.graphs,
        *manifest.feature_space,
        manifest.heads,
        manifest.reference,
        EVALUATION_PATH,
    ]
    for relative in required:
        if relative not in manifest.hashes:
            raise BundleError(f"{manifest_path}: {relative} is not among the hashed files")
    return Bundle(path=path, manifest=manifest)


def write_manifest(path: Path, manifest: BundleManifest) -> BundleManifest:
    """Hash every file below ``path`` into ``manifest.files`` and write manifest.json.

    Every file is made world-readable (:data:`FILE_MODE`), so a bundle bind-mounted into
    the non-root container can be read.
    """
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    for file in files:
        file.chmod(FILE_MODE)
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        folder.chmod(FOLDER_MODE)  # a strict umask must not hide the bundle from the container
    manifest = dataclasses.replace(
        manifest,
        bundle_version=BUNDLE_VERSION,
        feature_names=feature_names(),
        files=[{"path": p.relative_to(path).as_posix(), "sha256": file_sha256(p)} for p in files],
    )
    manifest_path = path / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    manifest_path.chmod(FILE_MODE)
    return manifest
