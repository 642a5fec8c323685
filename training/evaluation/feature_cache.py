"""Every member's features on every image set, computed once and cached on disk.

The bundle builder computes features with the service's own engine
(:class:`EngineFeatureExtractor`, no train/serve skew); tests and experiments without
exported graphs use the torch reference (:class:`ReferenceFeatureExtractor`). Either way
:class:`FeatureCache` keys each ``.npz`` file by the computation (the graph files'
SHA-256), the images and :data:`FEATURE_CODE_VERSION`, and reuses a file whose key
matches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scoring.bundle import file_sha256
from scoring.engine import default_threads
from scoring.features import feature_names
from training.extraction import (
    Extractor,
    GraphFiles,
    LocalExtractor,
    join_member_outputs,
    member_outputs,
)

__all__ = [
    "FEATURE_CODE_VERSION",
    "EngineFeatureExtractor",
    "FeatureCache",
    "FeatureExtractor",
    "ImageSetFeatures",
    "ReferenceFeatureExtractor",
]

#: Part of every feature cache key: bump it when the meaning of cached features changes.
FEATURE_CODE_VERSION = "features-v1"


class FeatureExtractor(Protocol):
    """All members' outputs for image sets, like ``ScorerEngine.run_batched``."""

    def cache_token(self) -> str:
        """Identifies the computation (e.g. the graph files' SHA-256) for the cache key."""

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, 28, 28)`` -> probabilities ``(M, B, 10)``, features ``(M, B, 37)``."""

    def extract_many(
        self, image_sets: Mapping[str, np.ndarray]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """What ``__call__`` gives, for every named set (in parallel where it can)."""


class EngineFeatureExtractor:
    """The shared scorer engine over every member's graph(s), in member order.

    ``extractor`` runs the passes (:mod:`training.extraction`): in this process by
    default, or as Ray tasks; the features are the same either way.
    """

    def __init__(
        self,
        graph_paths: Sequence[Path],
        batch_size: int = 1_024,
        extractor: Extractor | None = None,
        threads: int | None = None,
    ) -> None:
        self.graph_paths = [Path(path) for path in graph_paths]
        self.batch_size = batch_size
        self.extractor = extractor or LocalExtractor()
        self.graphs = GraphFiles.read(self.graph_paths, threads or default_threads())
        self._token = "engine:" + ",".join(file_sha256(path) for path in self.graph_paths)

    def cache_token(self) -> str:
        return self._token

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.extract_many({"images": images})["images"]

    def extract_many(self, image_sets):
        sets = {name: (self.graphs, images) for name, images in image_sets.items()}
        return self.extractor.map(member_outputs, join_member_outputs, sets, self.batch_size)


class ReferenceFeatureExtractor:
    """The torch reference (:mod:`training.reference`) of the same features.

    For tests and experiments without exported graphs; the bundle uses the engine.
    """

    def __init__(self, models: Sequence[Any], batch_size: int = 512) -> None:
        import torch

        self.models = list(models)
        self.batch_size = batch_size
        digest = hashlib.sha256()
        for model in self.models:
            for name, tensor in model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().numpy().tobytes())
        self._token = "reference:" + digest.hexdigest()
        self._torch = torch

    def cache_token(self) -> str:
        return self._token

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from training.model import images_to_tensor
        from training.reference import reference_scores

        probabilities, features = [], []
        for model in self.models:
            member_probabilities, member_features = [], []
            for start in range(0, len(images), self.batch_size):
                batch = images_to_tensor(images[start : start + self.batch_size])
                scores = reference_scores(model, batch)
                member_probabilities.append(scores.probabilities.numpy())
                member_features.append(
                    np.concatenate(
                        [
                            scores.entropy.numpy()[:, None],
                            scores.softmax_baseline.numpy()[:, None],
                            scores.gradient_metrics.reshape(len(batch), -1).numpy(),
                        ],
                        axis=1,
                    )
                )
            probabilities.append(np.concatenate(member_probabilities))
            features.append(np.concatenate(member_features))
        return np.stack(probabilities).astype(np.float32), np.stack(features).astype(np.float32)

    def extract_many(self, image_sets):
        return {name: self(images) for name, images in image_sets.items()}


@dataclass
class ImageSetFeatures:
    """All members' outputs on one image set."""

    probabilities: np.ndarray  # (M, B, 10)
    features: np.ndarray  # (M, B, 37)


class FeatureCache:
    """``.npz`` files keyed by computation, images and code version (provenance inside)."""

    def __init__(self, cache_dir: Path, extractor: FeatureExtractor, log: Callable) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.extractor = extractor
        self.token = extractor.cache_token()
        self.log = log

    def get(self, name: str, images: np.ndarray) -> ImageSetFeatures:
        return self.get_many({name: images})[name]

    def get_many(self, image_sets: Mapping[str, np.ndarray]) -> dict[str, ImageSetFeatures]:
        """Every named set's features: cached files where their keys match, the rest
        computed in one :meth:`FeatureExtractor.extract_many` call (parallel on Ray)."""
        provenances = {name: self._provenance(images) for name, images in image_sets.items()}
        results = {name: self._cached(provenance) for name, provenance in provenances.items()}
        missing = {name: image_sets[name] for name, result in results.items() if result is None}
        if missing:
            started = time.perf_counter()
            computed = self.extractor.extract_many(missing)
            seconds = time.perf_counter() - started
            for name, (probabilities, features) in computed.items():
                self._check(name, missing[name], probabilities, features)
                results[name] = self._store(provenances[name], probabilities, features)
            images = sum(len(images) for images in missing.values())
            self.log(f"features of {', '.join(missing)}: {images} images in {seconds:.1f} s")
        return results  # type: ignore[return-value]

    def _provenance(self, images: np.ndarray) -> dict:
        return {
            "computation": self.token,
            "images_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
            "images_shape": list(images.shape),
            "code_version": FEATURE_CODE_VERSION,
            "feature_names": feature_names(),
        }

    def _path(self, provenance: dict) -> Path:
        key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / f"features_{key[:32]}.npz"

    def _cached(self, provenance: dict) -> ImageSetFeatures | None:
        path = self._path(provenance)
        if path.exists():
            with np.load(path, allow_pickle=False) as cached:
                if json.loads(str(cached["provenance"])) == provenance:
                    return ImageSetFeatures(cached["probabilities"], cached["features"])
        return None

    @staticmethod
    def _check(name: str, images: np.ndarray, probabilities, features) -> None:
        if features.shape[1:] != (len(images), len(feature_names())):
            raise ValueError(
                f"The feature extractor returned features of shape {features.shape} for "
                f"{len(images)} images; expected (members, {len(images)}, {len(feature_names())})"
            )
        if not (np.isfinite(features).all() and np.isfinite(probabilities).all()):
            bad = int((~np.isfinite(features)).any(axis=2).sum())
            raise ValueError(
                f"The feature extractor returned nan or infinite values for {name} "
                f"({bad} of {features.shape[0] * len(images)} member-image pairs); "
                "a member's weights may have diverged"
            )

    def _store(self, provenance: dict, probabilities, features) -> ImageSetFeatures:
        result = ImageSetFeatures(probabilities.astype(np.float32), features.astype(np.float32))
        path = self._path(provenance)
        temporary = path.with_name(path.stem + ".tmp.npz")
        np.savez(
            temporary,
            probabilities=result.probabilities,
            features=result.features,
            provenance=np.array(json.dumps(provenance, sort_keys=True)),
        )
        temporary.replace(path)
        return result
