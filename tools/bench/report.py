"""Turn run records into the figures the benchmark reports, and draw the sweep."""

from __future__ import annotations

from pathlib import Path

from loraserve.tools.bench.load import RunResult


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summarize(result: RunResult, cache: dict | None = None) -> dict:
    ok = [r for r in result.records if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    latency = [r.latency_s * 1e3 for r in ok]
    warm = [r.latency_s * 1e3 for r in ok if r.load_source == "vram"]
    out = {
        "requests": len(result.records), "errors": len(result.records) - len(ok), "tokens": tokens,
        "wall_s": round(result.wall_s, 3), "tok_per_s": round(tokens / result.wall_s, 1),
        "req_per_s": round(len(ok) / result.wall_s, 2),
        "latency_ms": {p: round(percentile(latency, p), 1) for p in (50, 95, 99)},
        "warm_latency_p95_ms": round(percentile(warm, 95), 1),
        "ttft_ms": {p: round(percentile([r.ttft_s * 1e3 for r in ok], p), 1) for p in (50, 95)},
        "server_ttft_ms": {p: round(percentile([r.server_ttft_s * 1e3 for r in ok], p), 1) for p in (50, 95)},
        "itl_ms": {p: round(percentile([g * 1e3 for r in ok for g in r.gaps_s], p), 1) for p in (50, 95)},
        "cold_load_p95_ms": round(percentile([r.load_ms for r in ok if r.load_source == "disk"], 95), 1),
        "cold_loads": sum(1 for r in ok if r.load_source == "disk"),
    }
    if cache:
        hits, misses = cache["vram_hits"], cache["vram_misses"]
        out.update(cache_hit_ratio=round(hits / (hits + misses), 3) if hits + misses else 0.0,
                   evictions=cache["evictions"])
    return out


def plot(sweep: dict[int, dict], base: dict, naive: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(sweep)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(counts, [sweep[n]["tok_per_s"] for n in counts], "o-", label="loraserve")
    left.axhline(base["tok_per_s"], color="gray", ls="--", label="base model only (limit)")
    if naive:
        left.axhline(naive["tok_per_s"], color="red", ls=":", label="naive set_adapter + generate")
    left.set(xscale="log", xlabel="adapters in the workload", ylabel="tokens / s", title="Throughput")
    left.legend()
    right.plot(counts, [sweep[n]["latency_ms"][95] for n in counts], "o-", label="loraserve p95")
    right.axhline(base["latency_ms"][95], color="gray", ls="--", label="base model only p95")
    right.set(xscale="log", xlabel="adapters in the workload", ylabel="ms", title="p95 latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matrix(results: dict, path: Path) -> None:
    """Throughput against batch size: the HF references and every server run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["reference"]
    lines = [(name, ref[key], style) for key, name, style in (
        ("hf_static", "HF generate, static cache", "k--"), ("hf_eager", "HF generate, eager", "k:"),
        ("peft_mixed", "peft mixed batch", "r:")) if key in ref]
    lines += [("server " + ("base only" if k == "base" else f"{k} adapters"), v, "o-")
              for k, v in results["server"].items()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs, style in lines:
        batches = sorted(runs, key=int)
        ax.plot([int(b) for b in batches], [runs[b]["tok_per_s"] for b in batches], style, label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch (concurrent requests)", ylabel="tokens / s",
           title=f"{results['preset']['name']} on {ref['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
