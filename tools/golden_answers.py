"""The committed bundle's answers on the official MNIST test set, kept as a file.

``tests/test_default_bundle_answers.py`` compares the offline scorer against this file,
so a refactor that moves one number of what the default bundle serves fails there. The
file belongs to one ``model_version``; after the default bundle is rebuilt, write it
again::

    .venv/bin/python -m tools.golden_answers            # tests/data/default_bundle_mnist_test.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tools.harness import offline_scores

__all__ = ["GOLDEN_PATH", "golden_answers", "golden_fields", "write_golden_answers"]

REPOSITORY = Path(__file__).resolve().parents[1]
GOLDEN_PATH = REPOSITORY / "tests" / "data" / "default_bundle_mnist_test.npz"


def golden_answers(scorer, images: np.ndarray) -> dict[str, np.ndarray]:
    """What the golden file holds for ``images`` (N, 28, 28) uint8: one array per field."""
    return golden_fields(offline_scores(scorer, images, chunk=1000))


def golden_fields(answers: list[dict]) -> dict[str, np.ndarray]:
    """The golden file's arrays from score objects (``tools.harness.offline_scores``)."""
    return {
        "prediction": np.array([a["prediction"] for a in answers], np.int64),  # (N,)
        "probabilities": np.array([a["probabilities"] for a in answers], np.float64),  # (N, 10)
        "p_correct": np.array([a["p_correct"] for a in answers], np.float64),  # (N,)
        "p_ood": np.array([a["p_ood"] for a in answers], np.float64),  # (N,)
        "is_ood": np.array([a["is_ood"] for a in answers], bool),  # (N,)
        "scores": np.array([list(a["scores"].values()) for a in answers], np.float64),
        "score_names": np.array(list(answers[0]["scores"])),
    }


def write_golden_answers(bundle_dir: Path, data_dir: Path | None, path: Path) -> Path:
    from scoring.runtime import UncertaintyScorer
    from training.data.base import resolve_data_dir
    from training.data.mnist import load_mnist

    scorer = UncertaintyScorer.from_bundle(bundle_dir)
    images = load_mnist(resolve_data_dir(data_dir), "test").images
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, model_version=np.array(scorer.model_version), **golden_answers(scorer, images)
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle-dir", type=Path, default=REPOSITORY / "models" / "default")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=GOLDEN_PATH)
    arguments = parser.parse_args(argv)
    print(write_golden_answers(arguments.bundle_dir, arguments.data_dir, arguments.output))


if __name__ == "__main__":
    main()
