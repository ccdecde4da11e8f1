"""`make gpu-check`: what a CUDA machine should confirm, in one command of under 9 minutes.

For the offline CUDA machine of ../shared/gpu/README.md (no venv: python3 with the carried wheels,
PYTHONPATH=$PWD/var/srcpath as `make srcpath` links it). Four parts, each a child process in its own process group with its own
time limit, all within one budget; a part that fails or runs out of time is recorded and the
others still run:

1. engine: a TorchEngine on cuda over the 1b preset's random 1.1B Llama (built first, reused by
   part 4) decodes 8 rows for 40 steps, their blocks taken from scheduler.blocks.BlockManager as
   the scheduler takes them; asserts `attention_kernel == "flex"` and `decode_mode == "cuda
   graphs"` after those steps (a failed capture falls back to eager), and reports ms per decode
   step and how many greedy tokens agree with the reference attention kernel run eagerly;
2. pytest: `python3 -m pytest -q -m gpu tests`;
3. kvcap: `loraserve bench --kvcap` (tools/bench/kvcap.py) on the device;
4. matrix: `loraserve bench --preset 1b --batches 1,32,128 --adapter-counts 0,100 --references
   hf_static`, with whatever budget is left; it saves each part as it completes, so a second
   run with the same --out goes on where the first stopped.

Everything lands under --out (default var/gpu-check; `make gpu-check` passes $OUT): each part's
log, its JSON, and gpu-check.json; a table is printed at the end. Exit status 1 when a part failed.

`--stand-in` runs the same parts on this machine's device with small stand-ins (the tiny preset,
a tiny random Llama) and asserts nothing about kernels: it checks the script, not a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("engine", "pytest", "kvcap", "matrix")
LIMITS = {"engine": 110, "pytest": 150, "kvcap": 150, "matrix": 420}
"""Seconds each part may take at most; the matrix also gets no more than what the budget has left."""
BUDGET_S = 510


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_part(name: str, cmd: list[str], log: Path, limit_s: float) -> dict:
    """`cmd` in its own session (its servers and compile workers too), killed whole at `limit_s`."""
    started = time.monotonic()
    print(f"== {name}: {' '.join(cmd)}  (at most {limit_s:.0f} s; log {log})", flush=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        status = "ok"
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    if status == "ok" and rc:
        status = "failed"
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    seconds = round(time.monotonic() - started, 1)
    print(f"   {name}: {status} (exit {rc}) in {seconds} s", flush=True)
    return {"status": status, "rc": rc, "seconds": seconds, "log": str(log), "tail": tail}


# -- part 1, in its own process ------------------------------------------------
def engine_check(model: Path, device: str, out: Path, expect: bool) -> int:
    """Decode through the paged pool on `device`; on cuda, with `expect`, the kernel and mode must
    be FlexAttention and captured CUDA graphs."""
    import torch

    from loraserve.runner.config import EngineConfig
    from loraserve.runner.engine import TorchEngine
    from loraserve.scheduler.blocks import BlockManager
    from loraserve.scheduler.engine import Row
    from loraserve.scheduler.types import BASE, SamplingParams

    texts = [f"request {i}: the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(8)]

    async def generate(attention: str, graphs: str) -> dict:
        engine = TorchEngine(EngineConfig(model, device=device, max_rows=8, max_model_len=512,
                                          attention=attention, decode_graphs=graphs))
        await engine.start()
        try:
            blocks = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
            prompts = [tuple(engine.encode(t)) for t in texts]
            tables = [blocks.admit("base", p) for p in prompts]
            generated: list[list[int]] = [[] for _ in prompts]
            step_s = []
            for step in range(41):
                if step:
                    for i, p in enumerate(prompts):  # the position this step writes, as the scheduler grows it
                        assert blocks.grow(tables[i], len(p) + len(generated[i])), "the KV pool ran out"
                rows = [Row(i, BASE, tuple(tables[i].blocks), p, generated[i], SamplingParams())
                        for i, p in enumerate(prompts)]
                t0 = time.perf_counter()
                results = await (engine.decode(rows) if step else engine.prefill(rows))
                if step > 1:  # the first decode captures its bucket's graph
                    step_s.append(time.perf_counter() - t0)
                for i, res in enumerate(results):
                    assert res.error is None, res.error
                    generated[i].append(res.token_id)
            return {"attention_kernel": engine.attention_kernel, "decode_mode": engine.decode_mode,
                    "kv_blocks": engine.kv_blocks, "kv_block_size": engine.kv_block_size,
                    "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
                    "ms_per_decode_step": round(1e3 * sorted(step_s)[len(step_s) // 2], 3), "tokens": generated}
        finally:
            await engine.close()

    served = asyncio.run(generate("auto", "auto"))
    reference = asyncio.run(generate("reference", "off"))
    pairs = [(a, b) for ra, rb in zip(served["tokens"], reference["tokens"]) for a, b in zip(ra, rb)]
    report = {k: v for k, v in served.items() if k != "tokens"}
    report["tokens_equal_to_reference_kernel"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    report["rows_equal_to_reference_kernel"] = [ra == rb for ra, rb in zip(served["tokens"], reference["tokens"])]
    failures = []
    if expect:
        if served["attention_kernel"] != "flex":
            failures.append(f"attention_kernel is {served['attention_kernel']!r}, not 'flex'")
        if served["decode_mode"] != "cuda graphs":
            failures.append(f"decode_mode is {served['decode_mode']!r}, not 'cuda graphs'")
    report["failures"] = failures
    report["expected"] = "flex, cuda graphs" if expect else "nothing (stand-in)"
    (out / "engine.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


def build_model(out: Path, shape: str, device: str) -> Path:
    from loraserve.tools.bench.models import SHAPES, build_random_llama

    return build_random_llama(out / f"model-{shape}", SHAPES[shape], device)


# -- the summary ----------------------------------------------------------------
def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def figures(out: Path, preset: str) -> dict[str, str]:
    """One line of the most telling figures per part, from the JSON each wrote."""
    lines = {}
    e = _json(out / "engine.json")
    if e:
        lines["engine"] = (f"{e['device']}: attention {e['attention_kernel']}, decode {e['decode_mode']}, "
                           f"{e['ms_per_decode_step']} ms/step at 8 rows, tokens = reference kernel "
                           f"{e['tokens_equal_to_reference_kernel']}" + (f"; {'; '.join(e['failures'])}"
                                                                          if e["failures"] else ""))
    k = _json(out / "kvcap" / "kvcap.json")
    parts = []
    for row in k.get("capacity", [])[:2]:
        parts.append(f"{row['model']} @{row['max_model_len']}: {row['paged_sequences']} vs {row['old_sequences']} "
                     "seq/GiB")
    if "concurrency" in k:
        c = k["concurrency"]
        parts.append(f"{c['streams']} streams: peak {c['peak_running']} running, {c['kv_blocks_total']} blocks, "
                     f"{c['preemptions']} preemptions, answers = alone: {'yes' if c['answers_equal'] else 'no'}")
    if "prefix" in k:
        p = k["prefix"]
        parts.append(f"TTFT cached {p['prefix caching']['later_median_ttft_ms']} ms vs uncached "
                     f"{p['no prefix caching']['later_median_ttft_ms']} ms ({p['uncached_over_cached_median']}x)")
    if parts:
        lines["kvcap"] = "; ".join(parts)
    m = _json(out / "bench" / f"preset-{preset}.json")
    if m.get("server"):
        ref = m.get("reference", {}).get("hf_static", {})
        cells = []
        for b in map(str, m["preset"]["batches"]):
            cols = [f"HF {ref[b]['tok_per_s']:.0f}" if b in ref else "HF -"]
            cols += [f"{label if label == 'base' else label + ' adapters'} "
                     + (f"{runs[b]['tok_per_s']:.0f}" if b in runs else "-") for label, runs in m["server"].items()]
            cells.append(f"b{b}: " + ", ".join(cols))
        lines["matrix"] = "tok/s " + "; ".join(cells) + (f"; errors: {json.dumps(m['errors'])}" if m.get("errors")
                                                         else "")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m loraserve.tools.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "var/gpu-check"))
    parser.add_argument("--stand-in", action="store_true", help="small stand-ins on this machine's device "
                        "(tiny preset, tiny model); asserts nothing about the kernels")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {', '.join(PARTS)} [all]")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"all parts together [{BUDGET_S}]")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=S",
                        help="one part's own time limit (repeatable) " + json.dumps(LIMITS))
    parser.add_argument("--kvcap-model", type=Path, help="the demo base for kvcap [built under OUT/kvcap/demo]")
    parser.add_argument("--engine-check", metavar="SHAPE", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (ROOT / "tests").is_dir():  # an installed wheel has no tests/: the check runs a checkout's
        parser.error(f"no {ROOT / 'tests'}: run this from a loraserve checkout (make gpu-check)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.engine_check:  # part 1's child: the preset's model (built once, under out/bench like the matrix's)
        model = build_model(out / "bench", args.engine_check, args.device)
        return engine_check(model, args.device, out, expect=not args.stand_in)

    limits = dict(LIMITS)
    for item in args.limit:
        part, _, seconds = item.partition("=")
        limits[part] = float(seconds)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    py = sys.executable
    preset, device = ("tiny", "cpu") if args.stand_in else ("1b", "cuda")
    batches, counts = ("1,2", "0,3") if args.stand_in else ("1,32,128", "0,100")
    commands = {
        "engine": lambda: [py, "-m", "loraserve.tools.gpu_check", "--out", str(out), "--engine-check", preset,
                           "--device", device, *(["--stand-in"] if args.stand_in else [])],
        "pytest": lambda: [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"],
        "kvcap": lambda: [py, "-m", "loraserve.tools.cli", "bench", "--kvcap", "--out", str(out / "kvcap"),
                          "--device", device, *(["--model-path", str(args.kvcap_model)] if args.kvcap_model else [])],
        "matrix": lambda: [py, "-m", "loraserve.tools.cli", "bench", "--preset", preset, "--batches", batches,
                           "--adapter-counts", counts, "--references", "hf_static", "--device", device,
                           "--out", str(out / "bench")],
    }
    started = time.monotonic()
    report: dict = {"out": str(out), "stand_in": args.stand_in, "budget_s": args.budget_s, "parts": {}}
    for name in parts:
        left = args.budget_s - (time.monotonic() - started)
        if left < 20:
            report["parts"][name] = {"status": "skipped", "seconds": 0, "tail": ["no time left in --budget-s"]}
            continue
        report["parts"][name] = run_part(name, commands[name](), out / f"{name}.log", min(limits[name], left))
        if name == "pytest":
            report["parts"][name]["summary"] = next((line for line in reversed(report["parts"][name]["tail"])
                                                     if " in " in line and ("passed" in line or "skipped" in line
                                                                            or "failed" in line or "error" in line)),
                                                    "")
            if report["parts"][name]["rc"] == 5:  # no test collected: nothing failed
                report["parts"][name]["status"] = "none collected"
    report["seconds"] = round(time.monotonic() - started, 1)
    lines = figures(out, preset)
    if "pytest" in report["parts"]:
        lines["pytest"] = report["parts"]["pytest"].get("summary", "")
    report["figures"] = lines
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2))

    print(f"\ngpu-check{' (stand-in)' if args.stand_in else ''}: {report['seconds']} s, results in {out}")
    print(f"{'part':>8} {'status':>14} {'s':>7}  figures")
    for name, part in report["parts"].items():
        print(f"{name:>8} {part['status']:>14} {part['seconds']:>7}  {lines.get(name, '')}")
    failed = [n for n, p in report["parts"].items() if p["status"] not in ("ok", "none collected")]
    for name in failed:
        print(f"\n-- {name}: {report['parts'][name]['status']}; the end of {out / (name + '.log')}:")
        print("\n".join(report["parts"][name]["tail"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
