"""The benchmark runs end to end (a tiny configuration); it asserts what it reports, never timings."""

from __future__ import annotations

import argparse
import json

from loraserve.tools.bench.cli import add_bench_parser
from loraserve.tools.bench.load import Workload
from loraserve.tools.bench.overhead import scheduler_overhead


def test_bench_reports_every_figure(demo_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--model-path", str(demo_dir / "base"), "--out", str(tmp_path),
                              "--sweep", "1,3", "--adapters", "3", "--requests", "12", "--concurrency", "4",
                              "--new-tokens", "4:6", "--naive-requests", "3", "--pairs", "2"])
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
    # A second base-only and headline pair; the headline ratios are the pairs' median.
    first, second = report["pairs"]
    assert first["throughput_vs_base_only"] == round(
        report["sweep"]["3"]["tok_per_s"] / report["base_only"]["tok_per_s"], 3)
    assert report["ratios"]["throughput_vs_base_only"] == (
        first["throughput_vs_base_only"] + second["throughput_vs_base_only"]) / 2


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


def test_gpu_matrix_preset_runs_every_part_and_resumes(tmp_path):
    """The GPU preset's code path on its tiny stand-in: a random-weight model built locally, the HF
    references in a child process, the server base-only and with each adapter count at every batch."""
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert args.func(args) == 0
    path = tmp_path / "preset-tiny.json"
    report = json.loads(path.read_text())
    ref = report["reference"]
    assert set(ref["hf_static"]) == set(ref["hf_eager"]) == {"1", "2"} and set(ref["peft_mixed"]) == {"2"}
    assert not ref["hf_static"]["1"]["compiled"]  # transformers compiles the static cache on CUDA only
    assert ref["naive"]["requests"] == 3 and ref["naive"]["tokens"] == 12
    assert set(report["server"]) == {"base", "1", "3"} and "errors" not in report
    assert report["vram_slots"] == {"1": 64, "3": 64}  # --max-loras' default: the budget does not bind
    for runs in report["server"].values():
        assert set(runs) == {"1", "2"}
        for run in runs.values():
            assert run["errors"] == 0 and run["requests"] == 16 and run["tokens"] == 16 * 4
            assert 0 < run["server_ttft_ms"]["95"] <= run["latency_ms"]["95"]
    assert report["server"]["3"]["2"]["cold_loads"] + report["server"]["3"]["1"]["cold_loads"] >= 1
    assert {"base_vs_hf_static", "base_vs_hf_eager", "adapters_vs_base", "adapters_vs_peft_mixed"} <= set(
        report["ratios"]["2"])
    # A second run finds every part measured and keeps it.
    assert args.func(args) == 0
    assert json.loads(path.read_text())["server"] == report["server"]


def test_paged_capacity_counts_what_the_block_manager_holds():
    """`loraserve bench --kvcap capacity`: the 1b preset's geometry at 2048 positions held 16
    whole-context slots per GiB; 200-token sequences in 16-token blocks take 13 blocks each."""
    from loraserve.tools.bench.kvcap import capacity, paged_sequences

    rows = {(r["model"], r["max_model_len"]): r for r in capacity(max_lens=(2048,))}
    preset = next(r for (model, _), r in rows.items() if "1b" in model)
    assert preset["old_sequences"] == 16
    assert preset["paged_sequences"] == preset["blocks"] // 13 >= 150
    assert preset["paged_shared_prefix_sequences"] > preset["paged_sequences"]
    assert paged_sequences(26, 16, 100, 100) == 2 and paged_sequences(25, 16, 100, 100) == 1


def test_the_lora_step_bench_alternates_base_and_adapter_steps(demo_dir, tmp_path):
    """`python -m loraserve.tools.bench.lora_step`: the same batch's decode steps base-only and over adapters."""
    from loraserve.tools.bench.lora_step import lora_step
    from loraserve.tools.bench.synth import make_store

    make_store(demo_dir / "base", tmp_path / "store", 4, rank=4)
    out = lora_step(demo_dir / "base", tmp_path / "store", batch=6, adapters=4, rounds=2, steps=3)
    assert out["steps_each"] == 6 and 1 <= out["adapters_in_batch"] <= 4
    assert out["base_step_ms"] > 0 and abs(out["lora_over_base"] - out["lora_step_ms"] / out["base_step_ms"]) < 0.01
