"""The onnxruntime engine: providers, threads, input validation, output layout."""

from __future__ import annotations

import logging
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from scoring.engine import OUTPUT_NAMES, SINGLE_THREAD_MAX_BATCH, EngineOutput, ScorerEngine
from scoring.features import LAYER_NAMES, METRIC_NAMES, feature_names
from training.model import PaperCNN
from training.scorer_graph import export_scorer_graph

CHECK_IMAGES = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def graph_paths(tmp_path_factory) -> list:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("engine")
    paths = []
    try:
        for seed in (0, 1):
            torch.manual_seed(seed)
            path = directory / f"member_{seed}.onnx"
            export_scorer_graph(PaperCNN().eval(), path, CHECK_IMAGES)
            paths.append(path)
    finally:
        torch.set_num_threads(previous)
    return paths


@pytest.fixture(scope="module")
def engine(graph_paths) -> ScorerEngine:
    return ScorerEngine(graph_paths, threads=1)


def images(count: int) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def test_reports_the_provider_in_use(engine):
    assert engine.providers_in_use == ["CPUExecutionProvider"] * 2
    assert engine.providers_in_use == [s.get_providers()[0] for s in engine.sessions]


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA"
)
def test_requesting_cuda_without_it_falls_back_to_cpu_and_says_so(graph_paths, caplog):
    with caplog.at_level(logging.WARNING, logger="scoring.engine"):
        engine = ScorerEngine(graph_paths[:1], providers=["CUDAExecutionProvider"])
    assert engine.providers_in_use == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in caplog.text and "not available" in caplog.text


def test_thread_settings(graph_paths):
    engine = ScorerEngine(graph_paths[:1], threads=3)
    options = engine.sessions[0].get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert 1 <= ScorerEngine(graph_paths[:1]).threads <= 4


def test_small_batches_run_on_one_thread_copies_of_the_sessions(graph_paths):
    engine = ScorerEngine(graph_paths, threads=2)
    small = engine.sessions_for(SINGLE_THREAD_MAX_BATCH)
    assert [s.get_session_options().intra_op_num_threads for s in small] == [1, 1]
    assert engine.sessions_for(SINGLE_THREAD_MAX_BATCH + 1) is engine.sessions
    many = ScorerEngine(graph_paths[:1], threads=16)  # below 16 images, one thread
    assert many.sessions_for(15) is many.small_batch_sessions
    assert many.sessions_for(16) is many.sessions
    single = ScorerEngine(graph_paths[:1], threads=1)
    assert single.small_batch_sessions == single.sessions


def test_an_image_gets_the_same_outputs_in_a_batch_of_any_size(bundle_dir, mnist_test):
    """With T threads, onnxruntime split a reduction instead of the batch when a batch
    held fewer than T images, and the default bundle's gradient metrics then moved by up
    to 8e-6: an answer depended on how many requests it was batched with. Exact now."""
    graphs = sorted((bundle_dir / "graphs").glob("*.onnx"))[:2]
    images = mnist_test.images[:64]
    reference = ScorerEngine(graphs, threads=1).run(images)
    engine = ScorerEngine(graphs, threads=4)
    for size in (1, 2, 3, 4, 5, SINGLE_THREAD_MAX_BATCH, SINGLE_THREAD_MAX_BATCH + 1, 16, 64):
        output = engine.run(images[:size])
        for name in OUTPUT_NAMES:
            np.testing.assert_array_equal(
                getattr(output, name), getattr(reference, name)[:, :size], err_msg=name
            )


def test_output_shapes_and_feature_order(engine):
    output = engine.run(images(3))
    assert engine.num_members == output.num_members == 2
    assert output.probabilities.shape == (2, 3, 10)
    assert output.entropy.shape == output.softmax_baseline.shape == (2, 3)
    assert output.gradient_metrics.shape == (2, 3, len(LAYER_NAMES), len(METRIC_NAMES))
    assert output.penultimate.shape == (2, 3, 784)
    assert output.channel_statistics.shape == (2, 3, 64)  # 2 blocks x 16 channels x (mean, std)
    assert all(
        a.dtype == np.float32
        for a in (
            output.probabilities,
            output.entropy,
            output.gradient_metrics,
            output.channel_statistics,
        )
    )
    features = output.features()
    names = feature_names()
    assert features.shape == (2, 3, len(names))
    np.testing.assert_array_equal(features[..., names.index("entropy")], output.entropy)
    np.testing.assert_array_equal(
        features[..., names.index("softmax_baseline")], output.probabilities.max(axis=2)
    )
    layer, metric = LAYER_NAMES.index("conv2"), METRIC_NAMES.index("kurtosis")
    np.testing.assert_array_equal(
        features[..., names.index("kurtosis@conv2")], output.gradient_metrics[..., layer, metric]
    )


def test_uint8_and_float_inputs_agree(engine):
    batch = images(5)
    from_uint8 = engine.run(batch)
    from_float = engine.run((batch / np.float32(255.0)).astype(np.float32)[:, None])
    np.testing.assert_array_equal(from_uint8.gradient_metrics, from_float.gradient_metrics)


def test_members_are_stacked_in_order(engine, graph_paths):
    batch = images(2)
    both = engine.run(batch)
    second = ScorerEngine(graph_paths[1:], threads=1).run(batch)
    np.testing.assert_array_equal(both.probabilities[1], second.probabilities[0])


def test_run_batched_equals_run(engine):
    batch = images(11)
    whole = engine.run(batch)
    batched = engine.run_batched(batch, batch_size=4)
    assert isinstance(batched, EngineOutput)
    for name in ("probabilities", "entropy", "softmax_baseline", "gradient_metrics"):
        np.testing.assert_allclose(
            getattr(batched, name), getattr(whole, name), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize(
    ("bad", "described"),
    [
        (np.zeros((2, 28, 28), np.float64), "float64 of shape (2, 28, 28)"),
        (np.zeros((2, 1, 28, 28), np.uint8), "uint8 of shape (2, 1, 28, 28)"),
        (np.zeros((28, 28), np.uint8), "uint8 of shape (28, 28)"),
        (np.zeros((2, 32, 32), np.uint8), "uint8 of shape (2, 32, 32)"),
    ],
)
def test_rejects_wrong_input_with_the_shape_received(engine, bad, described):
    expected = (
        "images must be uint8 of shape (B, 28, 28) or float32 of shape (B, 1, 28, 28), "
        f"got {described}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        engine.run(bad)
    with pytest.raises(ValueError, match=re.escape(expected)):
        engine.run_batched(bad)


def test_rejects_empty_batch_and_bad_arguments(engine, graph_paths):
    with pytest.raises(ValueError, match=re.escape("got shape (0, 28, 28)")):
        engine.run(np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=re.escape("batch_size must be a positive integer, got 0")):
        engine.run_batched(images(2), batch_size=0)
    with pytest.raises(ValueError, match=re.escape("threads must be a positive integer")):
        ScorerEngine(graph_paths, threads=0)
    with pytest.raises(ValueError, match="graph_paths must be a non-empty sequence"):
        ScorerEngine([])
    with pytest.raises(FileNotFoundError, match="scorer graph not found"):
        ScorerEngine([graph_paths[0].with_name("missing.onnx")])


def test_engine_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, scoring.engine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_io_binding_is_off_on_the_cpu_by_default(engine):
    assert engine.bound_devices == [None, None]


def test_io_binding_gives_the_plain_run_outputs_exactly(graph_paths, engine):
    """The path CUDA sessions take (one upload a device, outputs bound to host), on the CPU."""
    bound = ScorerEngine(graph_paths, threads=1, io_binding=True)
    assert bound.bound_devices == [("cpu", 0), ("cpu", 0)]
    batch = images(5)
    plain, through_binding = engine.run(batch), bound.run(batch)
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(getattr(through_binding, name), getattr(plain, name))
