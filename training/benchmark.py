"""Side-by-side speed of the ways to compute per-sample gradient metrics.

On the same member(s) and the same real MNIST test images, in one run, with repeats
interleaved so that machine noise hits every method alike:

- ``naive``: one autograd backward per image in a Python loop (the paper's way),
- ``torch_func``: the ``vmap(grad)`` reference,
- ``graph``: the exported scorer graph in onnxruntime,
- ``forward``: the torch forward pass only,
- ``forward_backward``: forward plus ONE batched backward of the summed loss, the
  cost of an ordinary training step (the yardstick for "one backward pass"),

then the ensemble: one graph holding all M members against M one-member graphs, and
the served cost of one member: its graph alone against its graph plus every
feature-space score the service adds (energy, max logit, Mahalanobis, KNN, ViM; their
statistics fitted on the benchmark's own images, which changes no cost).
Reports images per second at the batch size, median latency at batch 1, and ratios.
No assertion on time anywhere: this only measures.

    python -m training.benchmark --members 5 --json benchmark.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch
from torch.nn import functional as F

from scoring.answer import feature_space_of
from scoring.engine import MAX_DEFAULT_THREADS, ScorerEngine
from scoring.placement import fallbacks, node_placements
from training.bundle_builder import fit_member_statistics
from training.config import BuildConfig
from training.data.base import resolve_data_dir
from training.data.mnist import load_mnist
from training.model import PaperCNN, images_to_tensor
from training.reference import naive_gradient_metrics, reference_scores
from training.scorer_graph import export_scorer_graph

#: Defaults: the issue's batch size, enough images for stable numbers in about a minute.
DEFAULT_BATCH_SIZE = 256
DEFAULT_IMAGES = 512
DEFAULT_REPEATS = 5
DEFAULT_LATENCY_CALLS = 30
DEFAULT_MEMBERS = 5
#: Images the export check runs on (the benchmark is not the place to test accuracy).
EXPORT_CHECK_IMAGES = 32
#: The issue's target: the ensemble graph at >= this fraction of one member's speed / M.
ENSEMBLE_TARGET = 0.8
#: The issue's target: a member's graph plus its feature-space scores at most this many
#: times the graph's own cost.
SERVED_TARGET = 1.15
#: ``--device`` choices and the onnxruntime providers each runs the graphs on.
DEVICES: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.benchmark", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--members-dir",
        type=Path,
        default=None,
        help="directory with member_<k>.safetensors/.json (a training output or bundle); "
        "default: random weights",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: resolve_data_dir()")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="MNIST test images")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--latency-calls", type=int, default=DEFAULT_LATENCY_CALLS)
    parser.add_argument("--members", type=int, default=DEFAULT_MEMBERS, help="ensemble size M")
    parser.add_argument(
        "--threads",
        type=int,
        default=min(os.cpu_count() or 1, MAX_DEFAULT_THREADS),
        help="torch threads and onnxruntime intra-op threads (the same, for fairness)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where everything runs: cpu (torch on the CPU, onnxruntime's CPU provider) or "
        "cuda (torch on the GPU, onnxruntime's CUDA provider with I/O binding); default cpu",
    )
    parser.add_argument(
        "--graph-batches",
        default="",
        help="comma-separated batch sizes at which to report the member graph's absolute "
        "images/s as well, e.g. 1,64,256,1024 (default: none)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        args.graph_batches = [int(part) for part in args.graph_batches.split(",") if part.strip()]
    except ValueError:
        parser.error(
            f"--graph-batches must be comma-separated integers, got {args.graph_batches!r}"
        )
    if any(batch < 1 for batch in args.graph_batches):
        parser.error(f"--graph-batches must be >= 1 each, got {args.graph_batches}")
    if args.device == "cuda":
        missing = cuda_missing()
        if missing:
            parser.error(f"--device cuda: {'; '.join(missing)}; use --device cpu")
    for name in ("images", "batch_size", "repeats", "latency_calls", "members", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def cuda_missing() -> list[str]:
    """What ``--device cuda`` needs and this machine lacks: torch's CUDA, onnxruntime's."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("torch sees no CUDA device here")
    available = ort.get_available_providers()
    if DEVICES["cuda"][0] not in available:
        missing.append(
            f"onnxruntime has no {DEVICES['cuda'][0]} here (it needs the onnxruntime-gpu "
            f"package; available: {', '.join(available)})"
        )
    return missing


def load_members(members_dir: Path | None, count: int) -> list[PaperCNN]:
    """``count`` members from a checkpoint directory, or seeded random ones."""
    if members_dir is None:
        models = []
        for member in range(count):
            torch.manual_seed(member)
            models.append(PaperCNN().eval())
        return models
    from training.train import load_member

    return [load_member(members_dir, member)[0] for member in range(count)]


def forward_only(model: PaperCNN) -> Callable[[torch.Tensor], object]:
    def run(images: torch.Tensor) -> object:
        with torch.no_grad():
            return model(images)

    return run


def forward_backward(model: PaperCNN) -> Callable[[torch.Tensor], object]:
    """Forward and one batched backward of the summed loss at the predicted classes."""
    parameters = list(model.parameters())

    def run(images: torch.Tensor) -> object:
        logits = model(images)
        loss = F.cross_entropy(logits, logits.detach().argmax(dim=1), reduction="sum")
        return torch.autograd.grad(loss, parameters)

    return run


def synchronize() -> None:
    """Wait for queued CUDA work, so that a timing ends when the GPU is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_once(function: Callable, batches: list) -> float:
    synchronize()
    start = time.perf_counter()
    for batch in batches:
        function(batch)
    synchronize()
    return time.perf_counter() - start


def measure(
    methods: dict[str, tuple[Callable, list, list]], repeats: int
) -> dict[str, dict[str, float]]:
    """Median throughput over the batches and median batch-1 latency, repeats interleaved.

    ``methods`` maps a name to (function, batches, single images); each repeat runs
    every method once, so slow phases of a noisy machine hit all of them alike.
    """
    for function, batches, singles in methods.values():  # warm up (allocators, sessions)
        function(batches[0])
        function(singles[0])
    throughput: dict[str, list[float]] = {name: [] for name in methods}
    latency: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (function, batches, singles) in methods.items():
            images = sum(len(batch) for batch in batches)
            throughput[name].append(images / time_once(function, batches))
            for single in singles:
                latency[name].append(time_once(function, [single]))
    return {
        name: {
            "images_per_second": statistics.median(throughput[name]),
            "latency_ms": 1e3 * statistics.median(latency[name]),
        }
        for name in methods
    }


def ratios(results: dict[str, dict[str, float]], graph: str, others: list[str]) -> dict:
    """Throughput ratio and latency ratio of ``graph`` against each of ``others``."""
    return {
        f"{graph}/{other}": {
            "throughput": results[graph]["images_per_second"] / results[other]["images_per_second"],
            "latency": results[graph]["latency_ms"] / results[other]["latency_ms"],
        }
        for other in others
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = load_mnist(resolve_data_dir(args.data_dir), "test")
    images = data.images[: args.images]  # (N, 28, 28) uint8
    device = torch.device(args.device)
    providers = DEVICES[args.device]
    tensor = images_to_tensor(images).to(device)  # (N, 1, 28, 28)
    models = load_members(args.members_dir, args.members)  # on the CPU: export, statistics
    member = copy.deepcopy(models[0]).to(device)  # what the torch methods run

    def split(array, batch_size=args.batch_size):
        return [array[start : start + batch_size] for start in range(0, len(array), batch_size)]

    torch_batches, numpy_batches = split(tensor), split(images)
    latency_indices = range(min(args.latency_calls, len(images)))
    torch_singles = [tensor[i : i + 1] for i in latency_indices]
    numpy_singles = [images[i : i + 1] for i in latency_indices]
    check = images[:EXPORT_CHECK_IMAGES]

    with tempfile.TemporaryDirectory() as directory:
        member_paths = []
        for index, model in enumerate(models):
            path = Path(directory) / f"member_{index}.onnx"
            export_scorer_graph(model, path, check)
            member_paths.append(path)
        ensemble_path = Path(directory) / "ensemble.onnx"
        export_scorer_graph(models, ensemble_path, check)

        def engine(paths):
            return ScorerEngine(paths, providers=providers, threads=args.threads)

        member_engine, separate_engine = engine(member_paths[:1]), engine(member_paths)
        ensemble_engine = engine([ensemble_path])
        placements = node_placements(member_paths[0], providers[0])

        def torch_method(function):
            return (function, torch_batches, torch_singles)

        def graph_method(engine):
            return (engine.run, numpy_batches, numpy_singles)

        single = measure(
            {
                "naive": torch_method(lambda x: naive_gradient_metrics(member, x)),
                "torch_func": torch_method(lambda x: reference_scores(member, x)),
                "graph": graph_method(member_engine),
                "forward": torch_method(forward_only(member)),
                "forward_backward": torch_method(forward_backward(member)),
            },
            args.repeats,
        )
        ensemble = measure(
            {
                "one_member_graph": graph_method(member_engine),
                "ensemble_graph": graph_method(ensemble_engine),
                "member_graphs": graph_method(separate_engine),
            },
            args.repeats,
        )
        # Fitted as a build fits them, on the first test images (only their shapes
        # matter to the cost): four times the KNN bank.
        fit_count = min(len(data.images), 4 * BuildConfig().feature_space.knn_bank_size)
        statistics = fit_member_statistics(
            models[0],
            member_paths[0],
            data.images[:fit_count],
            data.labels[:fit_count],
            BuildConfig(),
        )

        def served(batch):
            output = member_engine.run(batch)
            return feature_space_of(output, [statistics])

        served_cost = measure(
            {
                "graph": graph_method(member_engine),
                "graph_and_feature_space": (served, numpy_batches, numpy_singles),
            },
            args.repeats,
        )
        provider = member_engine.providers_in_use[0]
        by_batch = {
            str(batch): measure(
                {"graph": (member_engine.run, split(images, batch), numpy_singles[:1])},
                args.repeats,
            )["graph"]["images_per_second"]
            for batch in args.graph_batches
        }

    one_member_speed = ensemble["one_member_graph"]["images_per_second"]
    ensemble_speed = ensemble["ensemble_graph"]["images_per_second"]
    return {
        "settings": {
            "images": len(images),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "latency_calls": len(torch_singles),
            "members": args.members,
            "weights": str(args.members_dir) if args.members_dir else "random",
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_intra_op_threads": member_engine.threads,
            "onnxruntime_inter_op_threads": 1,
            "onnxruntime_provider": provider,
            "torch_device": str(device),
            "cpu_count": os.cpu_count(),
        },
        "graph_placement": {
            "nodes": dict(Counter(node.provider for node in placements)),
            "fallbacks": [
                f"{node.name} ({node.op}) on {node.provider}"
                for node in fallbacks(placements, providers[0])
            ],
        },
        "graph_images_per_second_by_batch": by_batch,
        "one_member": single,
        "one_member_ratios": ratios(
            single, "graph", ["naive", "forward_backward", "torch_func", "forward"]
        ),
        "ensemble": ensemble,
        "ensemble_ratios": {
            **ratios(ensemble, "ensemble_graph", ["member_graphs"]),
            "ensemble_graph_vs_target": ensemble_speed / (one_member_speed / args.members),
            "target": ENSEMBLE_TARGET,
        },
        "served_member": served_cost,
        "served_member_cost": {
            # cost ratios (time per image): above 1 = the feature-space scores add cost
            "throughput": served_cost["graph"]["images_per_second"]
            / served_cost["graph_and_feature_space"]["images_per_second"],
            "latency": served_cost["graph_and_feature_space"]["latency_ms"]
            / served_cost["graph"]["latency_ms"],
            "target": SERVED_TARGET,
        },
    }


def print_report(results: dict) -> None:
    settings = results["settings"]
    print(
        f"threads: torch {settings['torch_threads']}, onnxruntime intra-op "
        f"{settings['onnxruntime_intra_op_threads']} inter-op 1 (spinning off), "
        f"provider {settings['onnxruntime_provider']}, torch on {settings['torch_device']}, "
        f"{settings['cpu_count']} CPUs"
    )
    placement = results["graph_placement"]
    nodes = ", ".join(f"{count} on {name}" for name, count in sorted(placement["nodes"].items()))
    print(
        f"member graph nodes: {nodes}; "
        f"per-image nodes off the provider: {placement['fallbacks'] or 'none'}"
    )
    print(
        f"{settings['images']} MNIST test images, batch {settings['batch_size']}, "
        f"{settings['repeats']} interleaved repeats, weights: {settings['weights']}"
    )
    for title, table in (
        ("one member", "one_member"),
        (f"{settings['members']} members", "ensemble"),
        ("one member, served", "served_member"),
    ):
        print(f"\n{title:<24} {'images/s':>10} {'batch-1 ms':>11}")
        for name, row in results[table].items():
            print(f"{name:<24} {row['images_per_second']:>10.0f} {row['latency_ms']:>11.2f}")
    print(f"\n{'ratio':<36} {'throughput':>10} {'latency':>8}")
    for key in ("one_member_ratios", "ensemble_ratios"):
        for name, row in results[key].items():
            if isinstance(row, dict):
                print(f"{name:<36} {row['throughput']:>10.2f} {row['latency']:>8.2f}")
    ensemble = results["ensemble_ratios"]
    print(
        f"ensemble graph / (one member / M): {ensemble['ensemble_graph_vs_target']:.2f} "
        f"(target >= {ensemble['target']})"
    )
    if results["graph_images_per_second_by_batch"]:
        print("\nmember graph images/s by batch size:")
        for batch, speed in results["graph_images_per_second_by_batch"].items():
            print(f"  batch {batch:>5}: {speed:>10.0f}")
    served = results["served_member_cost"]
    print(
        f"served member cost / graph cost: {served['throughput']:.2f} at batch "
        f"{settings['batch_size']}, {served['latency']:.2f} at batch 1 "
        f"(target <= {served['target']})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_benchmark(args)
    print_report(results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
