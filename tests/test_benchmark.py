"""The speed benchmark runs end to end and reports every table it promises.

Tiny settings (two members, a few real test images, one repeat): this checks that the
benchmark measures what its report names, never how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch", reason="the benchmark needs torch")

from training.benchmark import main  # noqa: E402


def test_the_benchmark_reports_every_method_and_the_served_member_cost(data_dir, tmp_path, capsys):
    output = tmp_path / "benchmark.json"
    argv = ["--data-dir", str(data_dir), "--members", "2", "--images", "16"]
    argv += ["--batch-size", "8", "--repeats", "1", "--latency-calls", "2", "--threads", "1"]
    assert main([*argv, "--json", str(output)]) == 0
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
    assert "served member cost / graph cost" in capsys.readouterr().out
