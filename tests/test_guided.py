"""Guided decoding (runner/guided.py) on the trained demo model: every answer under a response_format
parses and validates, whatever else shares its batch, and equals the same request served alone."""

from __future__ import annotations

import asyncio
import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest
import torch

from conftest import ADAPTERS, PROMPT, demo_ref
from loraserve.v1 import inference_pb2 as pb
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.runner.guided import Guide
from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import BASE, ResponseFormat, SamplingParams
from test_generate import details, gen

# The demo is a tiny greedy model: a bare "string" or "integer" never closes (its strings run on
# in prose), so the schema bounds them, as a schema for a real model may not need to.
PERSON = json.dumps({"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["new", "vip"]}, "maxItems": 2}},
    "required": ["name", "age"]})
FORMATS = {"schema": pb.ResponseFormat(json_schema=PERSON), "object": pb.ResponseFormat(json_object=pb.JsonObject()),
           "none": None}
SAMPLED = dict(temperature=1.0, top_k=40, seed=11)


def ask(stub, adapter: str, fmt: str, sampled: bool):
    extra = {"response_format": FORMATS[fmt]} if FORMATS[fmt] is not None else {}
    return gen(stub, adapter, PROMPT, max_new_tokens=128, **extra, **(SAMPLED if sampled else {}))


def test_every_guided_answer_parses_and_validates_across_adapters_in_one_batch(stub, server):
    """Greedy rows of each format on each adapter and the base, and sampled guided rows, together."""
    cases = [(a, f, False) for a in (*ADAPTERS, "base") for f in FORMATS]
    cases += [("legal", "schema", True), ("base", "schema", True), ("medical", "object", True),
              ("support", "object", True)]
    alone = {case: ask(stub, *case) for case in cases}
    batches_before = server.server.scheduler.stats.batches
    with ThreadPoolExecutor(len(cases)) as pool:
        together = dict(zip(cases, pool.map(lambda c: ask(stub, *c), cases)))
    assert server.server.scheduler.stats.batches - batches_before < len(cases) / 2  # really batched
    for case, resp in together.items():
        adapter, fmt, _ = case
        assert resp.adapter.id == adapter
        assert (resp.text, resp.usage.output_tokens) == (alone[case].text, alone[case].usage.output_tokens), case
        if fmt == "none":
            continue
        assert resp.finish_reason == pb.FINISH_REASON_EOS, case  # the JSON closed, then EOS
        answer = json.loads(resp.text)
        assert isinstance(answer, dict), case
        if fmt == "schema":
            jsonschema.validate(answer, json.loads(PERSON))
    # The demo does not answer JSON by itself: the constraint made these.
    assert not any(r.text.lstrip().startswith("{") for (_, f, _), r in together.items() if f == "none")


@pytest.mark.parametrize("schema", ["not json", '{"type": "nonsense"}', "", "x" * 70_000])
def test_a_schema_that_cannot_be_enforced_is_invalid_argument_naming_it_before_queueing(stub, server, schema):
    submitted = server.server.scheduler.stats.submitted
    with pytest.raises(grpc.RpcError) as caught:
        gen(stub, "legal", response_format=pb.ResponseFormat(json_schema=schema))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, field = details(caught.value)
    assert (info.reason, field) == ("INVALID_ARGUMENT", "response_format.json_schema")
    assert "json_schema" in caught.value.details() and "/project/" not in caught.value.details()
    assert server.server.scheduler.stats.submitted == submitted


def test_a_finished_json_object_keeps_choosing_eos_when_eos_is_ignored(stub):
    resp = gen(stub, "support", max_new_tokens=6, ignore_eos=True,
               response_format=pb.ResponseFormat(json_object=pb.JsonObject()))
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH and resp.usage.output_tokens == 6
    assert json.loads(resp.text) == {}


def test_a_guided_stream_concatenates_to_the_unary_answer(stub):
    request = pb.GenerateRequest(adapter_id="medical", prompt=PROMPT, max_new_tokens=96,
                                 response_format=FORMATS["schema"])
    unary = stub.Generate(request, timeout=60)
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert len(chunks) > 2 and "".join(c.text for c in chunks) == unary.text
    jsonschema.validate(json.loads(unary.text), json.loads(PERSON))


# -- the engine's side: rows built by hand, as the scheduler builds them ---------------------------

@pytest.fixture(scope="module")
def engine(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base", device="cpu", max_rows=8, max_model_len=192,
                                      kv_block_size=8))

    async def start():
        await engine.start()
        for name in ADAPTERS:
            ref = demo_ref(demo_dir, name)
            await engine.fetch(ref)
            await engine.attach(ref)
    asyncio.run(start())
    yield engine
    asyncio.run(engine.close())


_IDS = itertools.count()


class Batch:
    """Sequences through the real engine, each step's rows built from what they generated so far
    (as the scheduler builds them): the first step prefills (prompt and any tokens given), the
    next ones decode; a row leaves once it chose EOS or failed."""

    def __init__(self, engine: TorchEngine, demo_dir, specs: list[tuple[str, ResponseFormat | None, list[int]]],
                 min_new_tokens: int = 0):
        self.engine, self.min_new_tokens = engine, min_new_tokens
        manager = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
        self.prompt = tuple(engine.encode(PROMPT))
        self.seqs = [dict(id=next(_IDS), ref=demo_ref(demo_dir, name), fmt=fmt, generated=list(g),
                          table=manager.admit("s", (*self.prompt, *g))) for name, fmt, g in specs]
        self.manager, self.live, self.prefilled = manager, list(self.seqs), False

    def rows(self) -> list[Row]:
        rows = []
        for s in self.live:
            context = len(self.prompt) + len(s["generated"])
            assert self.manager.grow(s["table"], context)
            rows.append(Row(s["id"], s["ref"], tuple(s["table"].blocks), self.prompt, s["generated"], SamplingParams(),
                            upto=0 if self.prefilled else context, prefill=not self.prefilled,
                            min_new_tokens=self.min_new_tokens, response_format=s["fmt"]))
        return rows

    def step(self) -> list:
        """One step's results; nothing is appended (a retry would run the same rows)."""
        return asyncio.run(self.engine.step(self.rows()))

    def run(self, steps: int) -> list:
        """Up to `steps` steps, each result applied; -> the last step's results."""
        for _ in range(steps):
            results = self.step()
            self.prefilled = True
            going = []
            for s, r in zip(self.live, results, strict=True):
                if r.error is None and r.token_id not in self.engine.eos_token_ids:
                    s["generated"].append(r.token_id)
                    going.append(s)
            self.live = going
            if not self.live:
                break
        return results

    def text(self, i: int) -> str:
        return self.engine._tokenizer.decode(self.seqs[i]["generated"])


def test_a_row_whose_tokens_break_its_format_fails_alone(engine, demo_dir):
    """The bad row's tokens are not JSON: its result is its own error; its neighbours, guided and
    not, choose what they choose alone."""
    prose = engine.encode(" The court")[1:]
    specs = [("legal", ResponseFormat(PERSON), []), ("medical", ResponseFormat(PERSON), prose),
             ("base", None, []), ("support", ResponseFormat(), [])]
    together = Batch(engine, demo_dir, specs).step()
    assert together[1].error is not None and together[1].error.reason == "GUIDED_DECODING_FAILED"
    for i in (0, 2, 3):
        alone = Batch(engine, demo_dir, [specs[i]]).step()
        assert together[i].error is None and together[i].token_id == alone[0].token_id


def test_a_retried_step_chooses_the_same_token_and_a_resumed_sequence_replays_its_tokens(engine, demo_dir):
    batch = Batch(engine, demo_dir, [("legal", ResponseFormat(PERSON), [])])
    batch.run(12)
    assert batch.text(0).startswith('{"name": "')
    first, again = batch.step(), batch.step()  # the same rows twice: no matcher moves twice
    assert first[0].error is None and first[0].token_id == again[0].token_id
    # A sequence the guide has not seen (a new seq_id), the same tokens prefilled: its matcher is
    # built by replaying them.
    resumed = Batch(engine, demo_dir, [("legal", ResponseFormat(PERSON), batch.seqs[0]["generated"])])
    assert resumed.step()[0].token_id == first[0].token_id


def test_min_new_tokens_does_not_hold_back_eos_once_the_json_is_complete(engine, demo_dir):
    batch = Batch(engine, demo_dir, [("support", ResponseFormat(), [])], min_new_tokens=40)
    last = batch.run(40)
    assert batch.text(0) == "{}" and last[0].token_id in engine.eos_token_ids


def test_rows_without_a_format_pay_nothing(engine):
    """No copy of the logits, no mask, not even a compiler."""
    vocab = len(engine._tokenizer)
    guide = Guide(engine._tokenizer, vocab, engine.eos_token_ids, 4)
    rows = [Row(i, BASE, (), (1, 2), [], SamplingParams()) for i in range(3)]
    logits = torch.zeros(3, vocab)
    sampled, masked, faults = guide.constrain(rows, logits)
    assert sampled is rows and masked is logits and faults == {}


def test_a_length_bounded_string_takes_no_raw_control_character(engine):
    """xgrammar 0.2.9 lets one into strings with minLength/maxLength (runner/guided.py works around it)."""
    tokenizer = engine._tokenizer
    vocab = len(tokenizer)
    guide = Guide(tokenizer, vocab, engine.eos_token_ids, 4)
    inside = tokenizer.encode('{"name": "Ann', add_special_tokens=False)
    row = Row(next(_IDS), BASE, (), (1,), inside, SamplingParams(), response_format=ResponseFormat(PERSON))
    _, masked, faults = guide.constrain([row], torch.zeros(1, vocab))
    allowed = {tokenizer.decode([t]) for t in torch.nonzero(masked[0] == 0).flatten().tolist()}
    assert not faults and "n" in allowed and '"' in allowed
    assert not any(len(t) == 1 and ord(t) < 0x20 for t in allowed), sorted(map(repr, allowed))[:10]


def test_the_guided_bench_runs(demo_dir):
    from loraserve.tools.bench.guided import guided_costs

    rows = guided_costs(demo_dir / "base", batches=(2,), rounds=1)
    assert [r.get("format") for r in rows[:2]] == ["json_schema", "json_object"]
    assert rows[2]["batch"] == 2 and rows[2]["median_us"] > 0


def test_a_guided_step_reads_no_device_value_but_its_one_transfer(engine, demo_dir, monkeypatch):
    batch = Batch(engine, demo_dir, [("legal", ResponseFormat(PERSON), []), ("base", None, []),
                                     ("support", ResponseFormat(), [])])
    batch.run(3)
    from test_syncs import counting_reads

    reads, _ = counting_reads(monkeypatch, engine)
    results = batch.step()
    monkeypatch.undo()
    assert reads == [] and all(r.error is None for r in results)


@pytest.mark.gpu
def test_a_guided_cuda_step_synchronises_only_in_its_fetch(demo_dir, monkeypatch):
    """The bitmask goes in from page-locked memory, asynchronously; the mask is applied by a kernel."""
    engine = TorchEngine(EngineConfig(demo_dir / "base", device="cuda", max_rows=8, max_model_len=192,
                                      kv_block_size=16))
    asyncio.run(engine.start())
    try:
        batch = Batch(engine, demo_dir, [("base", ResponseFormat(PERSON), []), ("base", None, []),
                                         ("base", ResponseFormat(), [])])
        batch.run(3)  # allocates the bitmask and compiles the mask kernel: both synchronise, once
        torch.cuda.synchronize()
        from test_syncs import syncs_only_in_fetch

        with syncs_only_in_fetch(monkeypatch):
            results = batch.step()
        assert all(r.error is None for r in results)
    finally:
        asyncio.run(engine.close())
