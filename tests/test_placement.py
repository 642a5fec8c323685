"""Node placement: every per-image node of the served graphs runs on the provider asked for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from scoring.placement import NodePlacement, fallbacks, node_placements

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GRAPHS = sorted((ROOT / "models" / "default" / "graphs").glob("*.onnx"))
CUDA = "CUDAExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()


def test_the_default_bundle_has_graphs():
    assert DEFAULT_GRAPHS, "models/default/graphs holds no scorer graph"


@pytest.mark.parametrize(
    "provider",
    [
        "CPUExecutionProvider",
        pytest.param(
            CUDA,
            marks=pytest.mark.skipif(
                not HAS_CUDA, reason="onnxruntime has no CUDA provider on this machine"
            ),
        ),
    ],
)
def test_no_per_image_node_of_the_default_graph_falls_back(provider):
    placements = node_placements(DEFAULT_GRAPHS[0], provider)
    per_image = [node for node in placements if node.scales_with_batch]
    # The graph's convolutions, matmuls and window maxima all work per image; its shape
    # arithmetic (Shape, Gather on a shape) does not.
    assert len(per_image) > 300
    assert {"Conv", "MatMul", "ArgMax"} <= {node.op for node in per_image}
    assert "Shape" in {node.op for node in placements if not node.scales_with_batch}
    assert fallbacks(placements, provider) == [], "\n".join(
        f"{node.name} ({node.op}) on {node.provider}" for node in fallbacks(placements, provider)
    )


def test_fallbacks_name_per_image_work_elsewhere_but_not_shape_arithmetic_or_copies():
    placements = [
        NodePlacement("/MatMul_1", "MatMul", CUDA, True),
        NodePlacement("/ArgMax", "ArgMax", "CPUExecutionProvider", True),
        NodePlacement("/Shape", "Shape", "CPUExecutionProvider", False),
        NodePlacement("/ArgMax_token_0", "MemcpyToHost", CUDA, True),
    ]
    assert fallbacks(placements, CUDA) == [placements[1]]
    assert fallbacks(placements, "CPUExecutionProvider") == [placements[0]]


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_the_command_says_when_the_provider_is_missing():
    result = subprocess.run(
        [sys.executable, "-m", "scoring.placement", str(DEFAULT_GRAPHS[0])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert "'CUDAExecutionProvider' is not available in this onnxruntime build" in result.stderr


def test_the_command_passes_and_counts_nodes_on_the_cpu():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scoring.placement",
            *map(str, DEFAULT_GRAPHS[:2]),
            "--provider",
            "CPUExecutionProvider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("on CPUExecutionProvider; 0 fell back" in line for line in lines)
