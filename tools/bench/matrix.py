"""`loraserve bench --preset NAME`: the GPU benchmark matrix in one run.

For a random-weight Llama of real size (built locally), on one device: HF `generate` with a
compiled static cache (the torch ceiling) and eager, peft's mixed batch and the naive baseline
(a child process, tools/bench/ceiling.py), then this server base-only and with each adapter
count, each at every batch size (closed loop, as many clients as the batch). Parts already in the
JSON are kept, so a run cut short by a time limit goes on where it stopped (`--fresh` starts over).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraserve.tools.bench.load import Workload, run
from loraserve.tools.bench.report import summarize


@dataclass(frozen=True)
class Preset:
    shape: str
    quantization: str = "none"
    adapter_counts: tuple[int, ...] = (1, 100, 1000)
    headline: int = 100
    """The adapter count whose throughput is compared with base-only."""
    batches: tuple[int, ...] = (1, 8, 32, 128)
    peft_batches: tuple[int, ...] = (1, 32)
    new_tokens: int = 128
    rank: int = 16
    naive_requests: int = 8
    repeats: int = 2
    published: dict[int, float] = field(default_factory=dict)
    """Reference tok/s by batch from outside this run (bitsandbytes' published HF figures)."""
    server_args: tuple[str, ...] = ()


PRESETS = {
    # The 1.1B workload: bfloat16, r16 q/k/v/o adapters, Zipf 1.1, 128 new tokens.
    # Slots for every adapter a batch of 128 can hold at once (the VRAM budget only caps them), the
    # RAM tier for all 1,000.
    "1b": Preset("1b", server_args=("--max-loras", "128", "--vram-budget-mib", "16384", "--ram-budget-mib", "16384")),
    # The 8B-class model in nf4 with 20 adapters, against bitsandbytes' published Llama-3.1-8B NF4
    # figures on an H100 through plain HF generate.
    "8b-nf4": Preset("8b", quantization="nf4", adapter_counts=(20,), headline=20, batches=(1, 32),
                     peft_batches=(1, 32), published={1: 30.0, 32: 659.0},
                     server_args=("--max-loras", "20", "--vram-budget-mib", "16384")),
    # The CPU test's stand-in: the same path in about a minute.
    "tiny": Preset("tiny", adapter_counts=(1, 3), headline=3, batches=(1, 2), peft_batches=(2,), new_tokens=4,
                   rank=4, naive_requests=3, repeats=1),
}


REFERENCES = ("hf_static", "hf_eager", "peft")


def run_matrix(preset_name: str, out: Path, device: str, fresh: bool, extra_args: list[str],
               batches: tuple[int, ...] | None = None, counts: tuple[int, ...] | None = None,
               references: tuple[str, ...] | None = None) -> dict:
    """`batches`, `counts` (the server's adapter counts, 0 = base only) and `references` (some of
    REFERENCES) restrict or change the preset's; None keeps them."""
    from loraserve.tools.bench.server import ServerProcess
    from loraserve.tools.bench.models import SHAPES, build_random_llama
    from loraserve.tools.bench.synth import make_store

    preset = PRESETS[preset_name]
    if batches:
        preset = replace(preset, batches=tuple(batches))
    server_counts = (0, *preset.adapter_counts) if counts is None else tuple(dict.fromkeys(counts))
    if counts is not None:
        adapter_counts = tuple(c for c in server_counts if c > 0)
        if not adapter_counts:
            raise SystemExit("--adapter-counts needs a count above 0: the ratios compare it with base-only")
        headline = preset.headline if preset.headline in adapter_counts else max(adapter_counts)
        preset = replace(preset, adapter_counts=adapter_counts, headline=headline)
    references = REFERENCES if references is None else references
    if set(references) - set(REFERENCES):
        raise SystemExit(f"--references are some of {', '.join(REFERENCES)}, not {', '.join(references)}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"preset-{preset_name}.json"
    results = {} if fresh or not path.exists() else json.loads(path.read_text())

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    model = build_random_llama(out / f"model-{preset.shape}", SHAPES[preset.shape],
                               "cuda" if device != "cpu" and _cuda() else "cpu")
    store = out / f"store-{preset.shape}-r{preset.rank}"
    if not (store / "registry.json").exists() or not (store / f"bench{max(preset.adapter_counts) - 1}").is_dir():
        make_store(model, store, max(preset.adapter_counts), preset.rank)
    names = [f"bench{i}" for i in range(max(preset.adapter_counts))]
    dtype = "auto"
    results["preset"] = {"name": preset_name, **{k: v for k, v in vars(preset).items() if k != "published"},
                         "published": preset.published}

    def workload(adapters: list[str], batch: int, requests: int) -> Workload:
        return Workload(adapters, requests, 1.1, batch, None, (8, 24), (preset.new_tokens, preset.new_tokens))

    headline = names[:preset.headline]
    spec = {"model_path": str(model), "store": str(store), "device": device, "dtype": dtype,
            "quantization": preset.quantization, "batches": list(preset.batches),
            "peft_batches": list(preset.peft_batches), "new_tokens": preset.new_tokens,
            "prompt_tokens": _mean_prompt_tokens(model, workload(headline, 1, 64).plan()),
            "repeats": preset.repeats,
            "plan": workload(headline, 1, max(preset.naive_requests, max(preset.peft_batches))).plan(),
            "naive_requests": preset.naive_requests}
    reference = results.setdefault("reference", {})
    for part in references:
        if part in reference or (part == "peft" and "peft_mixed" in reference):
            continue
        done = subprocess.run([sys.executable, "-m", "loraserve.tools.bench.ceiling", json.dumps({**spec, "part": part})],
                              stdout=subprocess.PIPE, text=True)
        if done.returncode:  # e.g. a static cache that cannot be compiled: the other parts still run
            results.setdefault("errors", {})[part] = f"exited with status {done.returncode} (stderr above)"
            continue
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        reference["device"] = measured.pop("device")
        reference.update(measured if part == "peft" else {part: measured})
        save()

    server_args = ["--max-batch-size", str(max(preset.batches)), "--max-batch-tokens", "1000000",
                   "--max-lora-rank", str(preset.rank),  # slots sized for the adapters served, not rank 64
                   "--max-model-len", "512", "--quantization", preset.quantization, "--dtype", dtype,
                   "--device", device, *preset.server_args, *extra_args]
    results.setdefault("server", {})
    for count in server_counts:
        label = "base" if count == 0 else str(count)
        runs = results["server"].setdefault(label, {})
        todo = [b for b in preset.batches if str(b) not in runs]
        if not todo:
            continue
        adapters = ["base"] if count == 0 else names[:count]
        log = out / f"server-{preset_name}-{label}.log"
        try:
            server = ServerProcess(model, store, server_args, log=log)
        except (RuntimeError, TimeoutError) as exc:
            results.setdefault("errors", {})[f"server {label}"] = str(exc)
            continue
        try:
            for b in todo:
                # Graphs of this size are captured here; another seed, so the measured run's first
                # requests do not find their adapters loaded for them.
                asyncio.run(run(server.target, replace(workload(adapters, b, b), seed=1)))
                before = server.cache_stats()
                measured = asyncio.run(run(server.target, workload(adapters, b, max(16, 3 * b))))
                after = server.cache_stats()
                runs[str(b)] = summarize(measured, {k: after[k] - before[k] for k in ("vram_hits", "vram_misses",
                                                                                       "evictions")})
                if count:
                    results.setdefault("vram_slots", {})[label] = after["vram_slots"]
                save()
        finally:
            server.stop()
    results["ratios"] = ratios(results, preset)
    save()
    return json.loads(path.read_text())  # the keys as a reader of the file sees them


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _mean_prompt_tokens(model: Path, plan: list) -> int:
    """HF's inputs get as many tokens as the server's prompts have on average."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return round(sum(len(tokenizer(p).input_ids) for _, p, _ in plan) / len(plan))


def ratios(results: dict, preset: Preset) -> dict:
    """The issue's targets, each as measured / reference at every batch size."""
    server, ref = results["server"], results["reference"]
    out: dict = {}
    for b in map(str, preset.batches):
        base, head = server.get("base", {}).get(b), server.get(str(preset.headline), {}).get(b)
        row: dict = {}
        if base and b in ref.get("hf_static", {}):
            row["base_vs_hf_static"] = round(base["tok_per_s"] / ref["hf_static"][b]["tok_per_s"], 3)
        if base and b in ref.get("hf_eager", {}):
            row["base_vs_hf_eager"] = round(base["tok_per_s"] / ref["hf_eager"][b]["tok_per_s"], 3)
        if base and head:
            row["adapters_vs_base"] = round(head["tok_per_s"] / base["tok_per_s"], 3)
        if head and int(b) in preset.published:
            row["adapters_vs_published"] = round(head["tok_per_s"] / preset.published[int(b)], 3)
        if head and b in ref.get("peft_mixed", {}):
            row["adapters_vs_peft_mixed"] = round(head["tok_per_s"] / ref["peft_mixed"][b]["tok_per_s"], 2)
        out[b] = row
    return out


def print_matrix(results: dict) -> None:
    ref, server = results["reference"], results["server"]
    batches = results["preset"]["batches"]
    print(f"device: {ref['device']}; tok/s, {results['preset']['new_tokens']} new tokens per request")
    columns = [("HF static" + (" (compiled)" if any(r.get("compiled") for r in ref.get("hf_static", {}).values())
                               else ""), ref.get("hf_static", {})),
               ("HF eager", ref.get("hf_eager", {})), ("peft mixed", ref.get("peft_mixed", {}))]
    columns += [(f"server {k}" + ("" if k == "base" else " adapters"), v) for k, v in server.items()]
    print(f"{'batch':>6} " + " ".join(f"{name:>22}" for name, _ in columns))
    for b in map(str, batches):
        print(f"{b:>6} " + " ".join(f"{col[b]['tok_per_s']:>22.1f}" if b in col else f"{'-':>22}"
                                    for _, col in columns))
    if "naive" in ref:
        print(f"naive set_adapter + generate: {ref['naive']['tok_per_s']:.1f} tok/s")
    if results.get("vram_slots"):
        print(f"adapter slots the servers reserved: {json.dumps(results['vram_slots'])}")
    for part, error in results.get("errors", {}).items():
        print(f"not measured: {part}: {error}")
    for b, row in results["ratios"].items():
        head = server.get(str(results["preset"]["headline"]), {}).get(b, {})
        print(f"batch {b}: {json.dumps(row)}; server TTFT p95 {head.get('server_ttft_ms', {}).get('95', '-')} ms, "
              f"cold load p95 {head.get('cold_load_p95_ms', '-')} ms")
