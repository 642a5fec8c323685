"""The speed benchmark runs end to end and reports every table it promises.

Tiny settings (two members, a few real test images, one repeat): this checks that the
benchmark measures what its report names, never how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch", reason="the benchmark needs torch")

from training.benchmark import main  # noqa: E402


def test_the_benchmark_reports_every_method_and_the_served_member_cost(data_dir, tmp_path, capsys):
    output = tmp_path / "benchmark.json"
    argv = ["--data-dir", str(data_dir), "--members", "2", "--images", "16"]
    argv += ["--batch-size", "8", "--repeats", "1", "--latency-calls", "2", "--threads", "1"]
    assert main([*argv, "--graph-batches", "1,4", "--json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert set(results["one_member"]) == {
        "naive",
        "torch_func",
        "graph",
        "forward",
        "forward_backward",
    }
    assert set(results["ensemble"]) == {"one_member_graph", "ensemble_graph", "member_graphs"}
    assert set(results["served_member"]) == {"graph", "graph_and_feature_space"}
    for table in ("one_member", "ensemble", "served_member"):
        for row in results[table].values():
            assert row["images_per_second"] > 0 and row["latency_ms"] > 0
    cost = results["served_member_cost"]
    assert math.isfinite(cost["throughput"]) and math.isfinite(cost["latency"])
    assert set(results["graph_images_per_second_by_batch"]) == {"1", "4"}
    assert all(speed > 0 for speed in results["graph_images_per_second_by_batch"].values())
    # On the CPU provider every per-image node of the graph runs there.
    assert results["graph_placement"]["fallbacks"] == []
    assert results["graph_placement"]["nodes"]["CPUExecutionProvider"] > 300
    printed = capsys.readouterr().out
    assert "served member cost / graph cost" in printed and "batch     4:" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--graph-batches", "1,x"], "--graph-batches must be comma-separated integers"),
        (["--graph-batches", "0"], "--graph-batches must be >= 1 each"),
    ],
)
def test_bad_benchmark_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_device_cuda_names_what_this_machine_lacks(capsys):
    """Each missing piece (torch's CUDA, onnxruntime's CUDA provider) is named, before any
    work starts; where both are present the option is accepted (nothing to check)."""
    import onnxruntime as ort

    torch_lacks = not torch.cuda.is_available()
    runtime_lacks = "CUDAExecutionProvider" not in ort.get_available_providers()
    if not (torch_lacks or runtime_lacks):
        pytest.skip("this machine has CUDA in torch and in onnxruntime")
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--device cuda:" in error
    assert ("torch sees no CUDA device here" in error) == torch_lacks
    assert ("onnxruntime has no CUDAExecutionProvider here" in error) == runtime_lacks
