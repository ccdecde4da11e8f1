"""The benchmark runs end to end (a tiny configuration); it asserts what it reports, never timings."""

from __future__ import annotations

import argparse
import json

from tools.bench.cli import add_bench_parser
from tools.bench.load import Workload
from tools.bench.overhead import scheduler_overhead


def test_bench_reports_every_figure(demo_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--model-path", str(demo_dir / "base"), "--out", str(tmp_path),
                              "--sweep", "1,3", "--adapters", "3", "--requests", "12", "--concurrency", "4",
                              "--new-tokens", "4:6", "--naive-requests", "3"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["sweep"]) == {"1", "3"}
    for run in (report["base_only"], *report["sweep"].values()):
        assert run["errors"] == 0 and run["requests"] == 12 and run["tok_per_s"] > 0
        assert {50, 95, 99} == {int(k) for k in run["latency_ms"]}
        assert 0 <= run["cache_hit_ratio"] <= 1
    assert report["sweep"]["3"]["cold_loads"] >= 1  # every adapter starts on disk
    assert report["naive"]["requests"] == 3
    assert {"throughput_vs_base_only", "throughput_vs_naive", "warm_p95_vs_base_only_p95"} <= set(report["ratios"])
    assert report["scheduler_overhead"]["ms_per_request"] > 0
    assert report["engine_limit"]["tokens"] == sum(n for _, _, n in Workload(
        ["base"], 12, 1.1, 4, None, (8, 24), (4, 6)).plan())
    assert {"base_only_vs_naive", "engine_limit_vs_naive"} <= set(report["ratios"])


def test_workload_plan_is_reproducible_and_zipf_skewed():
    adapters = [f"a{i}" for i in range(50)]
    plan = Workload(adapters, requests=2000, zipf_s=1.1, seed=3).plan()
    assert plan == Workload(adapters, requests=2000, zipf_s=1.1, seed=3).plan()
    counts = sorted((sum(1 for a, _, _ in plan if a == x) for x in adapters), reverse=True)
    assert counts[0] > 5 * counts[len(counts) // 2]  # a few adapters get most of the traffic
    uniform = Workload(adapters, requests=2000, zipf_s=None, seed=3).plan()
    assert max(sum(1 for a, _, _ in uniform if a == x) for x in adapters) < 80


def test_scheduler_overhead_is_measured_with_a_free_engine():
    result = scheduler_overhead(requests=200, adapters=10, new_tokens=4, concurrency=8)
    assert result["requests"] == 200 and result["ms_per_request"] > 0
