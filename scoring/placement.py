"""Which execution provider runs each node of a scorer graph, from onnxruntime's profiler.

A graph asked to run on CUDA can still run nodes on the CPU: onnxruntime puts a node
whose kernel the CUDA provider lacks (an op, or an op at a dtype, such as the graph's
float64 matmuls and window maxima) on the CPU and copies tensors across the bus around
it, silently. It also puts small shape computations (Shape, Gather on a shape, Concat
of dimensions) on the CPU on purpose; those are cheap and harmless.

:func:`node_placements` runs a graph twice with onnxruntime's profiler on (batches of
:data:`PROBE_BATCHES` images) and reads, for every node of the optimized graph, its
op, the provider that ran it and whether its output grows with the batch.
:func:`fallbacks` names the nodes that do real work (an output that grows with the
batch) elsewhere than on the wanted provider; the test suite and
``python -m scoring.placement`` fail on any.

    python -m scoring.placement models/default/graphs/*.onnx --provider CUDAExecutionProvider
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from scoring.engine import INPUT_NAME
from scoring.features import IMAGE_SIZE

__all__ = ["NodePlacement", "fallbacks", "main", "node_placements"]

#: Two batch sizes: a node whose output size differs between them works per image.
PROBE_BATCHES = (1, 3)
#: Ops that only move data between providers (onnxruntime inserts them).
COPY_OPS = frozenset({"MemcpyToHost", "MemcpyFromHost"})


@dataclass(frozen=True)
class NodePlacement:
    """One node of the optimized graph as onnxruntime ran it."""

    name: str
    op: str
    provider: str
    scales_with_batch: bool  # its output grows with the batch: per-image work


def _profiled_nodes(
    graph: Path, providers: Sequence[str], batch: int, directory: Path
) -> dict[str, tuple[str, str, int]]:
    """``{node: (op, provider, output bytes)}`` of one profiled run at ``batch`` images."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(directory / f"batch_{batch}")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=list(providers))
    images = np.random.default_rng(0).uniform(0, 1, (batch, 1, IMAGE_SIZE, IMAGE_SIZE))
    session.run(None, {INPUT_NAME: images.astype(np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    suffix = "_kernel_time"
    return {
        event["name"][: -len(suffix)]: (
            event["args"]["op_name"],
            event["args"]["provider"],
            int(event["args"].get("output_size", 0)),
        )
        for event in events
        if event.get("cat") == "Node" and event["name"].endswith(suffix)
    }


def node_placements(graph: Path | str, provider: str) -> list[NodePlacement]:
    """Every node of ``graph`` (optimized as the engine runs it) with its provider.

    The session asks for ``provider`` with the CPU as the last resort, as
    :class:`scoring.engine.ScorerEngine` does. Raises ``ValueError`` when ``provider``
    is not in this onnxruntime build.
    """
    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(
            f"execution provider {provider!r} is not available in this onnxruntime build "
            f"(available: {available})"
        )
    providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    with tempfile.TemporaryDirectory() as directory:
        small, large = (
            _profiled_nodes(Path(graph), providers, batch, Path(directory))
            for batch in PROBE_BATCHES
        )
    return [
        NodePlacement(name, op, provider, large.get(name, (op, provider, size))[2] != size)
        for name, (op, provider, size) in small.items()
    ]


def fallbacks(placements: Sequence[NodePlacement], provider: str) -> list[NodePlacement]:
    """Nodes doing per-image work on another provider than ``provider``."""
    return [
        node
        for node in placements
        if node.provider != provider and node.scales_with_batch and node.op not in COPY_OPS
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scoring.placement", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("graphs", type=Path, nargs="+", help="scorer graph files (.onnx)")
    parser.add_argument(
        "--provider",
        default="CUDAExecutionProvider",
        help="the provider every per-image node must run on (default CUDAExecutionProvider)",
    )
    args = parser.parse_args(argv)
    failed = False
    for graph in args.graphs:
        try:
            placements = node_placements(graph, args.provider)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        counts = Counter(node.provider for node in placements)
        wrong = fallbacks(placements, args.provider)
        summary = ", ".join(f"{count} on {name}" for name, count in sorted(counts.items()))
        print(f"{graph}: {len(placements)} nodes: {summary}; {len(wrong)} fell back")
        for node in wrong:
            print(f"  {node.name} ({node.op}) on {node.provider}")
        failed = failed or bool(wrong)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
