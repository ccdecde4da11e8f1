"""`loraserve bench`: sweep adapter counts against a real server, beside the naive baseline and the
base-model-only limit; writes bench.json and bench.png."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from loraserve.tools.bench.load import Workload, run
from loraserve.tools.bench.matrix import PRESETS, print_matrix, run_matrix
from loraserve.tools.bench.report import plot, plot_matrix, summarize
from loraserve.tools.bench.server import ServerProcess


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a real server against the naive baseline and the base-only limit")
    p.add_argument("--model-path", type=Path, help="base model directory [a bench-size Llama (hidden 256, 4 layers, "
                                                   "untrained) built under --out]")
    p.add_argument("--out", type=Path, default=Path("var/bench"))
    p.add_argument("--sweep", default="1,10,100,500", help="adapter counts to run [1,10,100,500]")
    p.add_argument("--adapters", type=int, default=100, help="adapter count of the headline run and the naive one")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    p.add_argument("--rate", type=float, help="open-loop Poisson arrivals per second instead of closed loop")
    p.add_argument("--zipf", type=float, default=1.1, help="popularity skew; 0 = uniform")
    p.add_argument("--prompt-words", default="8:24")
    p.add_argument("--new-tokens", default="32:32")
    p.add_argument("--naive-requests", type=int, default=32, help="0 skips the naive baseline")
    p.add_argument("--pairs", type=int, default=1,
                   help="base-only and headline runs, alternated this many times; the ratios are each pair's, "
                        "and their median (a shared machine drifts between two runs by more than LoRA costs) [1]")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="the server's compute dtype; the naive baseline (always on CPU) uses the same, "
                        "float32 for auto [auto]")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag (repeatable)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the GPU matrix instead of the sweep: builds the "
                   "preset's random-weight model and measures HF (compiled static cache, eager), peft and this "
                   "server at every batch size (tools/bench/matrix.py); the other workload flags do not apply")
    p.add_argument("--device", default="auto", help="with --preset or --kvcap: auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--fresh", action="store_true", help="with --preset: measure again what the JSON already has")
    p.add_argument("--batches", help="with --preset: batch sizes to run, comma-separated [the preset's]")
    p.add_argument("--adapter-counts", help="with --preset: the server's adapter counts, comma-separated, 0 = "
                                            "base only [0 and the preset's]")
    p.add_argument("--references", help="with --preset: the reference parts to run, comma-separated from "
                                        "hf_static, hf_eager, peft; empty for none [all three]")
    p.add_argument("--kvcap", nargs="?", const="capacity,concurrency,prefix", metavar="PARTS",
                   help="the paged KV cache's capacity instead of the sweep (tools/bench/kvcap.py): sequences "
                        "per GiB against one slot per sequence, 48 streams on the demo model at --kv-cache-mib 4, "
                        "TTFT with a cached 400-token prefix; writes kvcap.json. PARTS: some of capacity, "
                        "concurrency, prefix [all]; --model-path: the demo base [built under --out]")
    p.set_defaults(func=run_bench)


def bench_model(out: Path) -> Path:
    """The size the performance brief measured with; throughput needs no training."""
    from loraserve.runner.demo import DemoSpec, build_demo

    if not (out / "base" / "config.json").exists():
        build_demo(out, DemoSpec(adapters=(), hidden_size=256, layers=4, base_steps=0))
    return out / "base"


def _range(raw: str) -> tuple[int, int]:
    lo, _, hi = raw.partition(":")
    return int(lo), int(hi or lo)


def _ints(raw: str | None) -> tuple[int, ...] | None:
    return None if raw is None else tuple(int(n) for n in raw.split(",") if n.strip())


def run_bench(args) -> int:
    if args.kvcap:
        from loraserve.tools.bench.kvcap import run_kvcap

        extra = ["--device", args.device, "--dtype", args.dtype, *args.server_arg]
        return run_kvcap(args.out, tuple(p.strip() for p in args.kvcap.split(",") if p.strip()), args.model_path,
                         extra)
    if args.preset:
        references = None if args.references is None else tuple(p for p in args.references.split(",") if p)
        results = run_matrix(args.preset, args.out, args.device, args.fresh, args.server_arg,
                             batches=_ints(args.batches), counts=_ints(args.adapter_counts), references=references)
        try:
            plot_matrix(results, args.out / f"preset-{args.preset}.png")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'loraserve[bench]')", file=sys.stderr)
        print_matrix(results)
        return 0
    from loraserve.tools.bench.engine_limit import engine_limit
    from loraserve.tools.bench.naive import run_naive
    from loraserve.tools.bench.overhead import scheduler_overhead
    from loraserve.tools.bench.synth import make_store

    counts = sorted({int(n) for n in args.sweep.split(",")} | {args.adapters})
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model_path is None:
        args.model_path = bench_model(args.out / "model")
    store = make_store(args.model_path, args.out / "store", max(counts), args.rank).root
    extra = ["--max-batch-size", str(args.concurrency), "--dtype", args.dtype, *args.server_arg]

    def workload(adapters: list[str]) -> Workload:
        return Workload(adapters, args.requests, args.zipf or None, args.concurrency, args.rate,
                        _range(args.prompt_words), _range(args.new_tokens))

    def measure(adapters: list[str]) -> dict:
        server = ServerProcess(args.model_path, store, extra)
        try:
            asyncio.run(run(server.target, Workload(adapters[:1], 4, None, 1, None, (4, 4), (4, 4))))  # warm-up
            return summarize(asyncio.run(run(server.target, workload(adapters))), server.cache_stats())
        finally:
            server.stop()

    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                if k != "func"}}
    headline = [f"bench{i}" for i in range(args.adapters)]
    results["base_only"] = measure(["base"])
    results["sweep"] = {n: measure([f"bench{i}" for i in range(n)]) for n in counts}
    pairs = [(results["base_only"], results["sweep"][args.adapters])]
    pairs += [(measure(["base"]), measure(headline)) for _ in range(args.pairs - 1)]
    results["pairs"] = [_ratios(head, base) for base, head in pairs]
    naive = None
    if args.naive_requests:
        plan = workload(headline).plan()[:args.naive_requests]
        naive = run_naive(args.model_path, store, plan, "float32" if args.dtype == "auto" else args.dtype)
        results["naive"] = {k: v for k, v in naive.items() if k != "latencies_s"}
    results["engine_limit"] = engine_limit(args.model_path, workload(["base"]).plan(), args.concurrency, args.dtype)
    results["scheduler_overhead"] = scheduler_overhead(adapters=args.adapters, concurrency=args.concurrency)
    head, base = results["sweep"][args.adapters], results["base_only"]
    results["ratios"] = {
        **{k: statistics.median(pair[k] for pair in results["pairs"]) for k in results["pairs"][0]},
        **({"throughput_vs_naive": round(head["tok_per_s"] / naive["tok_per_s"], 2),
            "base_only_vs_naive": round(base["tok_per_s"] / naive["tok_per_s"], 2),
            "engine_limit_vs_naive": round(results["engine_limit"]["tok_per_s"] / naive["tok_per_s"], 2)}
           if naive else {}),
    }
    (args.out / "bench.json").write_text(json.dumps(results, indent=2, default=lambda o: asdict(o)))
    try:
        plot(results["sweep"], base, results.get("naive"), args.out / "bench.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'loraserve[bench]')", file=sys.stderr)
    _print(results, args.adapters)
    return 0


def _ratios(head: dict, base: dict) -> dict:
    return {"throughput_vs_base_only": round(head["tok_per_s"] / base["tok_per_s"], 3),
            "warm_p95_vs_base_only_p95": round(head["warm_latency_p95_ms"] / base["latency_ms"][95], 3)}


def _print(results: dict, headline: int) -> None:
    base = results["base_only"]
    print(f"{'run':>14} {'tok/s':>9} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'ttft p95':>9} "
          f"{'itl p95':>8} {'cold p95':>9} {'hit':>6} {'errors':>6}")
    rows = [("base only", base)] + [(f"{n} adapters", r) for n, r in results["sweep"].items()]
    for name, r in rows:
        print(f"{name:>14} {r['tok_per_s']:>9.1f} {r['req_per_s']:>7.2f} {r['latency_ms'][50]:>8.1f} "
              f"{r['latency_ms'][95]:>8.1f} {r['latency_ms'][99]:>8.1f} {r['ttft_ms'][95]:>9.1f} "
              f"{r['itl_ms'][95]:>8.1f} {r['cold_load_p95_ms']:>9.1f} {r.get('cache_hit_ratio', 0):>6.2f} {r['errors']:>6}")
    if "naive" in results:
        print(f"{'naive':>14} {results['naive']['tok_per_s']:>9.1f} {results['naive']['req_per_s']:>7.2f}")
    print(f"{'engine limit':>14} {results['engine_limit']['tok_per_s']:>9.1f}   (in process, base model, "
          f"static batches: no gRPC, scheduler or client)")
    print(f"scheduler overhead: {results['scheduler_overhead']['ms_per_request']:.3f} ms/request")
    if len(results["pairs"]) > 1:
        print(f"each pair at {headline} adapters: {json.dumps(results['pairs'])}")
    print(f"ratios at {headline} adapters: {json.dumps(results['ratios'])}")
