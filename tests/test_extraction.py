"""The build's engine passes: in the driver and as Ray tasks, bit for bit the same.

Real graphs and statistics of the committed bundle, real MNIST images, a real local Ray
instance (no dashboard, two CPUs) started by the test.
"""

from __future__ import annotations

import numpy as np
import pytest

from scoring.engine import ScorerEngine
from scoring.scores import FeatureSpaceStatistics
from training.evaluation.service_level import EnsembleView, ensemble_view_job
from training.extraction import (
    GraphFiles,
    LocalExtractor,
    RayExtractor,
    join_member_outputs,
    join_rows,
    member_feature_inputs,
    member_outputs,
)

BATCH = 128


@pytest.fixture(scope="module")
def graphs_and_statistics(bundle_dir):
    paths = [bundle_dir / "graphs" / f"member_{k}.onnx" for k in range(2)]
    statistics = [
        FeatureSpaceStatistics.load(bundle_dir / "feature_space" / f"member_{k}.npz")
        for k in range(2)
    ]
    return GraphFiles.read(paths, threads=2), paths, statistics


def passes(extractor, graphs: GraphFiles, statistics, images: np.ndarray) -> dict:
    """Every job of a build on the same images, flattened to named arrays."""
    one_member = GraphFiles(graphs.names[:1], graphs.contents[:1], graphs.threads)
    outputs = extractor.map(member_outputs, join_member_outputs, {"x": (graphs, images)}, BATCH)
    fit_inputs = extractor.map(member_feature_inputs, join_rows, {"x": (one_member, images)}, BATCH)
    view = extractor.map(
        ensemble_view_job,
        EnsembleView.concatenate,
        {"x": (graphs, images)},
        BATCH,
        statistics=statistics,
    )["x"]
    return {
        "probabilities": outputs["x"][0],
        "features": outputs["x"][1],
        "penultimate": fit_inputs["x"][0],
        "logits": fit_inputs["x"][1],
        "channel_statistics": fit_inputs["x"][2],
        "head_inputs": view.inputs,
        **{f"score {name}": values for name, values in view.scores.items()},
    }


def test_the_local_passes_are_the_engines_own_outputs(graphs_and_statistics, mnist_test):
    graphs, paths, _ = graphs_and_statistics
    images = mnist_test.images[:300]
    probabilities, features = LocalExtractor().map(
        member_outputs, join_member_outputs, {"x": (graphs, images)}, BATCH
    )["x"]
    expected = ScorerEngine(paths, threads=2).run_batched(images, BATCH)
    np.testing.assert_array_equal(probabilities, expected.probabilities)
    np.testing.assert_array_equal(features, expected.features())
    engines: dict = {}
    assert graphs.engine(engines) is graphs.engine(engines)  # opened once per cache
    assert graphs.engine(engines) is not graphs.engine({})


def test_ray_tasks_over_chunks_give_bit_identical_passes(
    graphs_and_statistics, mnist_test, monkeypatch
):
    """700 images in chunks of two batches of 128: three tasks per pass, the last partial."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    graphs, _, statistics = graphs_and_statistics
    images = mnist_test.images[:700]
    local = passes(LocalExtractor(), graphs, statistics, images)
    logged: list[str] = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        extractor = RayExtractor(chunk_batches=2, log=logged.append)
        on_ray = passes(extractor, graphs, statistics, images)
    finally:
        ray.shutdown()
    assert logged == [
        "member_outputs of 1 image sets as 3 Ray tasks",
        "member_feature_inputs of 1 image sets as 3 Ray tasks",
        "ensemble_view_job of 1 image sets as 3 Ray tasks",
    ]
    assert set(on_ray) == set(local) and len(local) > 6
    for name, values in local.items():
        assert values.shape[-2 if name in ("probabilities", "features") else 0] == 700
        np.testing.assert_array_equal(on_ray[name], values, err_msg=name)
