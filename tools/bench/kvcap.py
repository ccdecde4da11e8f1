"""`loraserve bench --kvcap`: what the paged KV cache holds, against one whole slot per sequence.

Three parts, each printed as a table and written to `kvcap.json` under --out:

* **capacity** (no model, no server): concurrent 200-token sequences (100-token prompt + 100
  generated) per GiB of KV, at max_model_len 2048 and 4096. The old scheme charged every sequence
  a slot of max_model_len positions (GiB // (max_model_len x bytes per token)); the paged one is
  counted by admitting such sequences into the real scheduler.blocks.BlockManager, sized to 1 GiB
  of blocks less the engine's scratch block, each grown to its 200 positions, until one does not
  fit. A third count gives them a common 96-token prompt prefix (prefix sharing).
* **concurrency**: a real server on the demo model with `--kv-cache-mib 4 --max-batch-size 64`;
  48 streams of 12-token prompts, 24 greedy new tokens each (ignore_eos), first each alone, one
  after the other, then all 48 at once. It reports the most requests running at once (the
  server's `loraserve_running_requests` gauge, polled), the pool's blocks, preemptions, and whether
  every answer equals the same request's answer alone.
* **prefix**: the server-reported time to first token (queued + loaded + prefilled) of requests
  sharing a 400-token prefix with distinct short questions, one at a time: the first (cold), then
  8 more (cached), for 5 prefixes, on a server with prefix caching and on one with
  `--no-prefix-caching`; with `usage.cached_input_tokens` where the response has it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import statistics
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loraserve.scheduler.blocks import BlockManager

GIB = 2**30
PARTS = ("capacity", "concurrency", "prefix")


# -- capacity: arithmetic and the real BlockManager --------------------------
@dataclass(frozen=True)
class KVGeometry:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    limit: int | None
    """The model's max_position_embeddings (the engine caps max_model_len there); None: geometry only."""


GEOMETRIES = (
    # TinyLlama-1.1B: 22 layers, 4 KV heads of 64 (GQA), bfloat16.
    KVGeometry("TinyLlama-1.1B", 22, 4, 64, "bfloat16", None),
    # The GPU matrix's random 1.1B (tools/bench/models.py "1b"): 16 layers, 8 KV heads of 64.
    KVGeometry("bench 1b preset", 16, 8, 64, "bfloat16", 4096),
    # The demo model (runner.demo): 2 layers, 4 KV heads of 32, served in float32 on a CPU.
    KVGeometry("demo", 2, 4, 32, "float32", 512),
)


def bytes_per_token(g: KVGeometry, max_len: int, block_size: int) -> int:
    import torch

    from loraserve.runner.kvpool import PoolGeometry

    return PoolGeometry(g.layers, g.kv_heads, g.head_dim, max_len, block_size).bytes_per_token(getattr(torch, g.dtype))


def paged_sequences(blocks: int, block_size: int, prompt: int, generated: int, shared_prefix: int = 0) -> int:
    """Sequences of prompt + generated tokens the BlockManager holds at once, each admitted for its
    prompt (published, as after its prefill) and grown to its full length, until one does not fit."""
    manager = BlockManager(blocks, block_size, prefix_caching=shared_prefix > 0)
    common = list(range(1, shared_prefix + 1))
    held = 0
    while True:
        own = [1_000_000 + held * prompt + i for i in range(prompt - shared_prefix)]
        tokens = common + own
        table = manager.admit("base#", tokens)
        if table is None:
            return held
        manager.publish(table, "base#", tokens)
        if not manager.grow(table, prompt + generated):
            return held
        held += 1


def capacity(max_lens=(2048, 4096), block_size: int = 16, prompt: int = 100, generated: int = 100,
             shared_prefix: int = 96, gib: float = 1.0) -> list[dict]:
    budget = int(gib * GIB)
    rows = []
    for g in GEOMETRIES:
        for max_len in max_lens:
            slot = min(max_len, g.limit) if g.limit else max_len
            per_token = bytes_per_token(g, slot, block_size)
            blocks = budget // (block_size * per_token) - 1  # less the scratch block, as the engine does
            old = budget // (slot * per_token)
            paged = paged_sequences(blocks, block_size, prompt, generated)
            shared = paged_sequences(blocks, block_size, prompt, generated, shared_prefix)
            rows.append({"model": g.name, "dtype": g.dtype, "kib_per_token": per_token / 1024,
                         "max_model_len": max_len, "slot_tokens": slot, "old_sequences": old,
                         "blocks": blocks, "block_size": block_size, "paged_sequences": paged,
                         "paged_shared_prefix_sequences": shared,
                         "ratio": round(paged / old, 1) if old else None})
    return rows


def print_capacity(rows: list[dict], prompt: int = 100, generated: int = 100, shared_prefix: int = 96) -> None:
    print(f"\nconcurrent {prompt + generated}-token sequences ({prompt} prompt + {generated} generated) per GiB of KV")
    print(f"{'model':>16} {'dtype':>9} {'KiB/tok':>8} {'max_len':>8} {'slot':>5} {'old: slots':>10} "
          f"{'blocks':>7} {'paged':>6} {'x old':>6} {f'paged, {shared_prefix}-tok shared prefix':>30}")
    for r in rows:
        print(f"{r['model']:>16} {r['dtype']:>9} {r['kib_per_token']:>8g} {r['max_model_len']:>8} "
              f"{r['slot_tokens']:>5} {r['old_sequences']:>10} {r['blocks']:>7} {r['paged_sequences']:>6} "
              f"{r['ratio'] if r['ratio'] is not None else '-':>6} {r['paged_shared_prefix_sequences']:>30}")
    print("slot: positions the old scheme charged each sequence (max_model_len, capped at the model's own limit)")


# -- prompts of exact token counts ---------------------------------------------
def _words() -> list[str]:
    from loraserve.runner.demo import DOMAINS, QUESTIONS

    words = [w for q in QUESTIONS for w in q.split()]
    for domain in DOMAINS.values():
        for phrases in domain.values():
            words += [w for p in phrases for w in p.split()]
    return words


def exact_prompts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[str]:
    """`count` distinct texts the server's tokenizer encodes to exactly `tokens` ids."""
    rng, words, out = random.Random(seed), _words(), []
    for _ in range(count * 200):
        if len(out) == count:
            return out
        ids = tokenizer.encode(" ".join(rng.choices(words, k=tokens * 2)), add_special_tokens=True)
        if len(ids) < tokens:
            continue
        text = tokenizer.decode(ids[:tokens], skip_special_tokens=True)
        if len(tokenizer.encode(text, add_special_tokens=True)) == tokens and text not in out:
            out.append(text)
    raise RuntimeError(f"could not make {count} prompts of exactly {tokens} tokens")


def exact_prefix(tokenizer, tokens: int, seed: int) -> tuple[str, list[int]]:
    """A text of sentences cut to `tokens` ids, and those ids (stable under re-encoding)."""
    rng, words = random.Random(seed), _words()
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=True)) < tokens + 8:
        text += " ".join(rng.choices(words, k=12)) + ". "
    ids = tokenizer.encode(text, add_special_tokens=True)
    for n in range(tokens, tokens + 8):
        cut = tokenizer.decode(ids[:n], skip_special_tokens=True)
        again = tokenizer.encode(cut, add_special_tokens=True)
        if len(again) == n:
            return cut, again
    raise RuntimeError(f"could not cut a prefix of {tokens} tokens")


# -- a server and its gauges ----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GaugePoller:
    """Polls /metrics in a thread and keeps each watched gauge's highest value."""

    def __init__(self, port: int, names: tuple[str, ...], every_s: float = 0.005):
        self.url, self.names, self.every_s = f"http://127.0.0.1:{port}/metrics", names, every_s
        self.peak = {n: 0.0 for n in names}
        self.samples = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            body = response.read().decode()
        out = {}
        for name in self.names:
            m = re.search(rf"^{name} ([0-9.eE+-]+)$", body, re.MULTILINE)
            if m:
                out[name] = float(m.group(1))
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for name, value in self.read().items():
                    self.peak[name] = max(self.peak[name], value)
                self.samples += 1
            except OSError:
                self.errors += 1
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def _cache_stats(target: str) -> dict:
    import grpc

    from loraserve.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        stats = admin_pb2_grpc.AdapterAdminServiceStub(ch).GetCacheStats(admin_pb2.GetCacheStatsRequest(), timeout=10)
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields if f.name != "tiers"}


async def _stream(stub, prompt: str, new_tokens: int) -> dict:
    from loraserve.v1 import inference_pb2 as pb

    parts, last = [], None
    async for msg in stub.GenerateStream(pb.GenerateRequest(adapter_id="base", prompt=prompt,
                                                            max_new_tokens=new_tokens, ignore_eos=True), timeout=600):
        parts.append(msg.text)
        last = msg
    return {"text": "".join(parts), "input_tokens": last.usage.input_tokens,
            "output_tokens": last.usage.output_tokens,
            "cached_input_tokens": getattr(last.usage, "cached_input_tokens", None),
            "server_ttft_ms": last.timings.queue_ms + last.timings.load_ms + last.timings.prefill_ms}


async def _requests(target: str, prompts: list[str], new_tokens: int, together: bool) -> list[dict]:
    import grpc

    from loraserve.v1 import inference_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        if together:
            return list(await asyncio.gather(*(_stream(stub, p, new_tokens) for p in prompts)))
        return [await _stream(stub, p, new_tokens) for p in prompts]


def _server(model: Path, store: Path, args: list[str], log: Path):
    from loraserve.tools.bench.server import ServerProcess

    return ServerProcess(model, store, args, log=log)


# -- concurrency ------------------------------------------------------------------
def concurrency(model: Path, store: Path, out: Path, server_args: list[str], streams: int = 48,
                prompt_tokens: int = 12, new_tokens: int = 24, kv_cache_mib: float = 4,
                max_batch_size: int = 64) -> dict:
    from transformers import AutoTokenizer

    prompts = exact_prompts(AutoTokenizer.from_pretrained(model), streams, prompt_tokens)
    port = _free_port()
    flags = ["--kv-cache-mib", f"{kv_cache_mib:g}", "--max-batch-size", str(max_batch_size),
             "--metrics-port", str(port), *server_args]
    server = _server(model, store, flags, out / "kvcap-server-concurrency.log")
    try:
        started = time.perf_counter()
        alone = asyncio.run(_requests(server.target, prompts, new_tokens, together=False))
        alone_s = time.perf_counter() - started
        before = _cache_stats(server.target)
        names = ("loraserve_running_requests", "loraserve_kv_blocks_used")
        with GaugePoller(port, names) as poller:
            started = time.perf_counter()
            together = asyncio.run(_requests(server.target, prompts, new_tokens, together=True))
            together_s = time.perf_counter() - started
        after = _cache_stats(server.target)
    finally:
        server.stop()
    equal = [a["text"] == t["text"] for a, t in zip(alone, together, strict=True)]
    total, size = after.get("kv_blocks_total", 0), after.get("kv_block_size", 0)
    # The old scheme: one slot of max_model_len positions per sequence out of the same budget.
    per_token = after["kv_pool_bytes"] / ((total + 1) * size) if total and size else 0
    old_slots = int(kv_cache_mib * 2**20 // (after["max_context_tokens"] * per_token)) if per_token else None
    return {"server_flags": flags, "streams": streams, "prompt_tokens": sorted({r["input_tokens"] for r in alone}),
            "new_tokens": new_tokens, "output_tokens_ok": all(r["output_tokens"] == new_tokens for r in together),
            "peak_running": int(poller.peak["loraserve_running_requests"]),
            "peak_blocks_used": int(poller.peak["loraserve_kv_blocks_used"]),
            "metric_samples": poller.samples, "metric_errors": poller.errors,
            "kv_blocks_total": total, "kv_block_size": size, "kv_pool_bytes": after["kv_pool_bytes"],
            "max_model_len": after["max_context_tokens"], "old_scheme_slots": old_slots,
            "preemptions": after.get("preemptions", 0) - before.get("preemptions", 0),
            "answers_equal": all(equal), "answers_differing": equal.count(False),
            "alone_s": round(alone_s, 2), "together_s": round(together_s, 2)}


def print_concurrency(r: dict) -> None:
    print(f"\n{r['streams']} concurrent streams, {'/'.join(map(str, r['prompt_tokens']))}-token prompts, "
          f"{r['new_tokens']} new tokens, server {' '.join(r['server_flags'])}")
    print(f"{'peak running':>13} {'peak blocks used':>17} {'blocks':>7} {'block size':>11} {'preemptions':>12} "
          f"{'old scheme slots':>17} {'answers = alone':>16} {'all at once s':>14} {'one by one s':>13}")
    print(f"{r['peak_running']:>13} {r['peak_blocks_used']:>17} {r['kv_blocks_total']:>7} {r['kv_block_size']:>11} "
          f"{r['preemptions']:>12} {r['old_scheme_slots'] if r['old_scheme_slots'] is not None else '-':>17} "
          f"{('yes' if r['answers_equal'] else 'no, %d differ' % r['answers_differing']):>16} "
          f"{r['together_s']:>14} {r['alone_s']:>13}")


# -- prefix -----------------------------------------------------------------------
QUESTIONS = ("What should I do next?", "Can you help me with this?", "What happens now?", "Tell me more.",
             "How does this work?", "What do you recommend?", "Is this normal?", "Why did this happen?",
             "What are my options?", "Summarize this for me.", "What is the answer?", "Please explain it.")


def prefix_ttft(model: Path, store: Path, out: Path, server_args: list[str], prefix_tokens: int = 400,
                cached: int = 8, rounds: int = 5, new_tokens: int = 2, kv_cache_mib: float = 4,
                max_batch_size: int = 64) -> dict:
    """`rounds` prefixes, each asked 1 + `cached` distinct questions one after the other: the first
    finds nothing cached (cold), the others find the prefix's blocks (with prefix caching)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    other, _ = exact_prefix(tokenizer, prefix_tokens, seed=100)
    plan, kept = [], []
    for r in range(rounds):
        prefix, prefix_ids = exact_prefix(tokenizer, prefix_tokens, seed=r + 1)
        questions = [QUESTIONS[(r + i) % len(QUESTIONS)] for i in range(cached + 1)]  # each round's cold one differs
        plan.append([f"{prefix}\nQuestion: {q}\nAnswer:" for q in questions])
        ids = tokenizer.encode(plan[-1][0], add_special_tokens=True)
        kept.append(next((i for i, (a, b) in enumerate(zip(ids, prefix_ids)) if a != b), len(prefix_ids)))
    lengths = [len(tokenizer.encode(p, add_special_tokens=True)) for prompts in plan for p in prompts]
    results: dict = {"prefix_tokens": prefix_tokens, "prefix_tokens_kept_in_prompt": min(kept),
                     "prompt_tokens": [min(lengths), max(lengths)], "rounds": rounds, "cached_requests": cached,
                     "new_tokens": new_tokens}
    for mode, extra in (("prefix caching", []), ("no prefix caching", ["--no-prefix-caching"])):
        flags = ["--kv-cache-mib", f"{kv_cache_mib:g}", "--max-batch-size", str(max_batch_size), *extra, *server_args]
        server = _server(model, store, flags, out / f"kvcap-server-prefix-{'off' if extra else 'on'}.log")
        try:
            # Warm-up with another prefix of the same length: the cold requests pay no first-call costs.
            warm = [f"{other}\nQuestion: {QUESTIONS[0]}\nAnswer:"]
            before = _cache_stats(server.target)
            answers = asyncio.run(_requests(server.target, [*warm, *(p for prompts in plan for p in prompts)],
                                            new_tokens, together=False))[1:]
            after = _cache_stats(server.target)
        finally:
            server.stop()
        answers = [answers[i:i + cached + 1] for i in range(0, len(answers), cached + 1)]
        cold = [a[0]["server_ttft_ms"] for a in answers]
        later = [x["server_ttft_ms"] for a in answers for x in a[1:]]
        results[mode] = {"server_flags": flags, "cold_ttft_ms": [round(t, 2) for t in cold],
                         "cold_median_ttft_ms": round(statistics.median(cold), 2),
                         "later_ttft_ms": [round(t, 2) for t in later],
                         "later_median_ttft_ms": round(statistics.median(later), 2),
                         "cold_cached_input_tokens": sorted({a[0]["cached_input_tokens"] for a in answers},
                                                            key=str),
                         "later_cached_input_tokens": sorted({x["cached_input_tokens"] for a in answers
                                                              for x in a[1:]}, key=str),
                         "prefix_cache_hit_tokens": after.get("prefix_cache_hit_tokens", 0)
                         - before.get("prefix_cache_hit_tokens", 0)}
    on, off = results["prefix caching"], results["no prefix caching"]
    results["uncached_over_cached_median"] = round(off["later_median_ttft_ms"] / on["later_median_ttft_ms"], 2)
    results["cold_over_cached_median"] = round(on["cold_median_ttft_ms"] / on["later_median_ttft_ms"], 2)
    return results


def print_prefix(r: dict) -> None:
    print(f"\nserver-reported TTFT (queued + loaded + prefilled): {r['rounds']} prefixes of {r['prefix_tokens']} "
          f"tokens, each asked 1 (cold) + {r['cached_requests']} (later) distinct questions, one at a time "
          f"({r['prompt_tokens'][0]}-{r['prompt_tokens'][1]}-token prompts)")
    print(f"{'server':>18} {'cold median ms':>15} {'later median ms':>16} {'later min-max ms':>17} "
          f"{'cached tokens: cold / later':>28}")
    for mode in ("prefix caching", "no prefix caching"):
        m = r[mode]
        spread = f"{min(m['later_ttft_ms']):.2f}-{max(m['later_ttft_ms']):.2f}"
        tokens = " / ".join("/".join(map(str, v)) for v in (m["cold_cached_input_tokens"],
                                                            m["later_cached_input_tokens"]))
        print(f"{mode:>18} {m['cold_median_ttft_ms']:>15.2f} {m['later_median_ttft_ms']:>16.2f} {spread:>17} "
              f"{tokens:>28}")
    print(f"later median, no prefix caching / prefix caching: {r['uncached_over_cached_median']}x; "
          f"cold / later median with prefix caching: {r['cold_over_cached_median']}x")


# -- the command --------------------------------------------------------------------
def demo_model(out: Path) -> Path:
    """The demo base model (runner.demo, trained, no adapters) under `out`, built once."""
    from loraserve.runner.demo import DemoSpec, build_demo

    if not (out / "base" / "config.json").exists():
        build_demo(out, DemoSpec(adapters=()))
    return out / "base"


def _store_beside(model: Path, out: Path) -> Path:
    store = model.parent / "adapters"
    if (store / "registry.json").exists():
        return store
    from loraserve.registry.store import Store

    empty = out / "kvcap-store"
    empty.mkdir(parents=True, exist_ok=True)
    Store.local(empty).reindex()
    return empty


def run_kvcap(out: Path, parts: tuple[str, ...], model_path: Path | None, server_args: list[str]) -> int:
    """Runs the parts asked for; one that fails is recorded under "errors" and the rest still run.
    Returns 1 when one failed."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--kvcap parts are {', '.join(PARTS)}; not {', '.join(sorted(unknown))}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kvcap.json"
    results: dict = {}

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    def part(name: str, measure, show) -> None:
        try:
            results[name] = measure()
        except Exception as exc:  # noqa: BLE001 (recorded, and the exit status says so)
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            print(f"\n{name}: failed: {results['errors'][name]}")
            traceback.print_exc()
        else:
            show(results[name])
        save()

    if "capacity" in parts:
        part("capacity", capacity, print_capacity)
    if {"concurrency", "prefix"} & set(parts):
        model = Path(model_path) if model_path else demo_model(out / "demo")
        store = _store_beside(model, out)
        results["model"] = str(model)
        if "concurrency" in parts:
            part("concurrency", lambda: concurrency(model, store, out, server_args), print_concurrency)
        if "prefix" in parts:
            part("prefix", lambda: prefix_ttft(model, store, out, server_args), print_prefix)
    print(f"\nwritten: {path}")
    return 1 if results.get("errors") else 0
