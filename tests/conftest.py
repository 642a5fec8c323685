"""Shared fixtures: the real data directory (skipped with a reason where it is absent),
the one model bundle every test uses, its offline scorer, and torch's thread count.

Nothing here imports torch at module level: the serving tests run where only the service's
dependencies are installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from training.data.base import resolve_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / "models" / "default"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/datasets (or $GRADUNC_DATA_DIR); tests that need it skip when it is absent."""
    path = resolve_data_dir()
    if not (path / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real data sets not found in {path} (set GRADUNC_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def mnist_pooled(data_dir: Path) -> Any:
    from training.data.mnist import load_mnist

    return load_mnist(data_dir)


@pytest.fixture(scope="session")
def mnist_test(data_dir: Path) -> Any:
    """The official MNIST test set (10,000 digits and labels)."""
    from training.data.mnist import load_mnist

    return load_mnist(data_dir, "test")


@pytest.fixture(scope="session", autouse=True)
def isolated_state_home(tmp_path_factory) -> Iterator[Path]:
    """``$XDG_STATE_HOME`` in a temporary folder for the whole session (servers started
    as subprocesses inherit it): a server without its own GRADUNC_DATABASE_URL keeps its
    live store there, never in the user's ``~/.local/state`` and never in one file that
    grows across test runs."""
    state_home = tmp_path_factory.mktemp("state-home")
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(state_home)
    yield state_home
    if previous is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = previous


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on two shared cores torch's spinning pool stalls, one thread does not.

    Does nothing where torch is not installed (the serving tests do not need it).
    """
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    """$GRADUNC_TEST_BUNDLE or models/default; a missing bundle is a failure, not a skip."""
    path = Path(os.environ.get("GRADUNC_TEST_BUNDLE") or DEFAULT_BUNDLE)
    if not (path / "manifest.json").is_file():
        pytest.fail(
            f"no model bundle at {path} (no manifest.json): build models/default or point "
            "GRADUNC_TEST_BUNDLE at a bundle"
        )
    return path


@pytest.fixture(scope="session")
def offline(bundle_dir: Path) -> Any:
    """The bundle's scorer, run in-process: what the served answers must equal."""
    from scoring.runtime import UncertaintyScorer

    return UncertaintyScorer.from_bundle(bundle_dir)


@pytest.fixture(scope="session")
def offline_mnist_test_outputs(offline: Any, mnist_test: Any) -> list[Any]:
    """The offline engine's outputs for all 10,000 official MNIST test images, in the
    batches ``offline.score`` runs, computed once for every test that needs them."""
    images, step = mnist_test.images, offline.max_engine_batch
    starts = range(0, len(images), step)
    return [offline.engine.run(images[start : start + step]) for start in starts]


@pytest.fixture(scope="session")
def offline_mnist_test(offline: Any, offline_mnist_test_outputs: list[Any]) -> list[dict[str, Any]]:
    """The offline scorer's score objects for all 10,000 official MNIST test images: what
    ``offline.score`` answers, formed from the shared engine outputs."""
    from tools.harness import as_score_object

    return [
        as_score_object(result)
        for output in offline_mnist_test_outputs
        for result in offline.image_scores(output)
    ]
