"""Penalties, min_new_tokens, logprobs, prompt logprobs and score_only: against plain reference
implementations (a per-row loop, a plain HF forward of the tiny demo model), batched equal to
alone, transactional under a failing row, and kept once across a preemption."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from conftest import PROMPT, demo_ref
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.runner.sampling import Processor, sample
from loraserve.scheduler.engine import Row, StepResult
from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.policy import BatchLimits
from loraserve.scheduler.scheduler import Scheduler
from loraserve.scheduler.types import BASE, FinishReason, GenerationRequest, SamplingParams, TextDelta, TokenLogprob

EOS = frozenset({0, 3})


def _row(i, prompt, generated, sampling=SamplingParams(), **kw) -> Row:
    return Row(i, BASE, (), tuple(prompt), list(generated), sampling, **kw)


def _reference(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """One row, token by token: HF's repetition penalty, then OpenAI's frequency and presence."""
    s, p = logits.clone(), row.sampling
    for t in set(row.prompt_ids) | set(row.generated):
        s[t] = s[t] / p.repetition_penalty if s[t] > 0 else s[t] * p.repetition_penalty
    for t in set(row.generated):
        s[t] -= p.frequency_penalty * row.generated.count(t) + p.presence_penalty
    if len(row.generated) < row.min_new_tokens:
        for t in EOS:
            s[t] = float("-inf")
    return s


def _rows(vocab: int) -> list[Row]:
    g = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [
        _row(0, draw(7), draw(5), SamplingParams(repetition_penalty=1.3)),
        _row(1, draw(3), [], SamplingParams()),
        _row(2, draw(9), draw(12), SamplingParams(frequency_penalty=0.7, presence_penalty=0.4, temperature=0.8,
                                                  top_k=20, seed=3)),
        _row(3, draw(4), draw(2), SamplingParams(temperature=1.0, seed=4), min_new_tokens=5),
        _row(4, draw(5), draw(30), SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5,
                                                  presence_penalty=1.5, temperature=0.7, top_p=0.9, seed=5)),
        _row(5, draw(2), draw(1), SamplingParams(), min_new_tokens=1),
        _row(6, draw(3), [], SamplingParams(presence_penalty=1.0)),  # nothing to penalise yet
        _row(7, draw(6), [], SamplingParams(repetition_penalty=2.0, temperature=0.5, seed=8), min_new_tokens=2),
    ]


def test_penalties_and_min_new_tokens_match_a_plain_per_row_reference():
    vocab = 50
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(0)) * 3
    rows = _rows(vocab)
    processor = Processor(torch.device("cpu"), EOS, 2)  # a small buffer: it grows when a step needs more
    scores = processor(logits, rows)
    for i, row in enumerate(rows):
        assert torch.allclose(scores[i], _reference(logits[i], row)), i
    assert torch.equal(scores[1], logits[1])  # an unpenalised row's scores are untouched
    quiet, head = [rows[1], _row(9, [1], [2])], logits[:2]
    assert processor(head, quiet) is head  # nothing asked: nothing computed


def test_a_penalised_row_chooses_in_any_batch_what_it_chooses_alone():
    vocab = 50
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(2)) * 3
    rows = _rows(vocab)
    processor = Processor(torch.device("cpu"), EOS)
    steps = [len(r.generated) for r in rows]
    together = sample(processor(logits, rows), [r.sampling for r in rows], steps)
    for i, row in enumerate(rows):
        alone = sample(processor(logits[i:i + 1], [row]), [row.sampling], steps[i:i + 1])
        assert int(alone) == int(together[i]), i
        assert int(together[i]) not in EOS or len(row.generated) >= row.min_new_tokens


# -- the real engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_dir):
    eng = TorchEngine(EngineConfig(demo_dir / "base", device="cpu", max_rows=8, max_model_len=160,
                                   kv_block_size=8, prefill_chunk_tokens=8))
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def hf(demo_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_dir / "base", dtype=torch.float32).eval()


def _hf_logprobs(hf, ids) -> torch.Tensor:
    """[len(ids), vocab]: log_softmax of a plain HF forward over `ids`, position p scoring ids[p + 1]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check(entry: TokenLogprob, lp: torch.Tensor, token: int, top: int) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(lp[token]), abs=1e-4)
    assert entry.rank == 1 + int((lp > lp[token] + 1e-5).sum())
    best = lp.topk(top)
    assert [t for t, _ in entry.top] == best.indices.tolist()
    assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def _serve(engine, requests, limits=BatchLimits(), one_by_one=False, **kwargs):
    """Each request's events (TextDeltas, then its Completion or its error), served together, or
    each after the one before has finished (`one_by_one`), by one scheduler."""
    async def run():
        scheduler = Scheduler(engine, limits, batch_wait_s=0.05, **kwargs)
        task = asyncio.create_task(scheduler.run())
        try:
            tickets = [] if one_by_one else [scheduler.submit(r) for r in requests]
            out = []
            for i in range(len(requests)):
                t = scheduler.submit(requests[i]) if one_by_one else tickets[i]
                deltas = []
                try:
                    async for item in t.events():
                        deltas.append(item)
                except LoraServeError as exc:  # a failed request's answer
                    deltas.append(exc)
                out.append(deltas)
            return out, scheduler.stats
        finally:
            task.cancel()
    return asyncio.run(run())


def _request(engine, rid, prompt=PROMPT, max_new=6, **kw) -> GenerationRequest:
    return GenerationRequest(rid, kw.pop("adapter", BASE), tuple(engine.encode(prompt)), max_new, ignore_eos=True, **kw)


def test_logprobs_and_prompt_logprobs_equal_a_plain_forwards(engine, hf, monkeypatch):
    """Greedy, 3 alternatives per token, the prompt scored in chunks of 8 beside a decoding row."""
    long_prompt = PROMPT + " and what does the contract say about the notice period?"
    asking = _request(engine, "a", long_prompt, logprobs=3, prompt_logprobs=2)
    other = _request(engine, "b", max_new=12)
    steps = {"_prefill": 0, "_mixed": 0}
    for name in steps:
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda rows, real=real, name=name: steps.__setitem__(name, steps[name] + 1)
                            or real(rows))
    events, stats = _serve(engine, [other, asking], BatchLimits(max_num_batched_tokens=10))
    assert steps["_prefill"] and steps["_mixed"]  # prompt positions scored in both kinds of step
    done = events[-1]
    completion = done[-1]
    prompt = asking.prompt_ids
    assert completion.token_ids == tuple(t for d in done[:-1] for t in d.token_ids)
    assert len(completion.token_ids) == completion.output_tokens == 6
    assert completion.logprobs == tuple(lp for d in done[:-1] for lp in d.logprobs)
    lp = _hf_logprobs(hf, [*prompt, *completion.token_ids])
    for k, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        _check(entry, lp[len(prompt) - 1 + k], token, 3)
        assert entry.rank == 1  # greedy, and the scores it chose from are the ones returned
    assert completion.prompt_logprobs[0] == TokenLogprob(prompt[0], None)
    assert len(completion.prompt_logprobs) == len(prompt)
    for p, entry in enumerate(completion.prompt_logprobs[1:]):
        _check(entry, lp[p], prompt[p + 1], 2)
    assert events[0][-1].logprobs is None and events[0][-1].prompt_logprobs is None


def test_a_sampled_penalised_rows_logprobs_are_of_its_penalised_scores_before_temperature(engine, hf):
    """What docs/architecture.md promises: log_softmax of the model's logits after the penalties (a plain HF
    forward, penalised by the per-row reference), temperature not applied."""
    sampling = SamplingParams(temperature=1.5, top_p=0.95, seed=11, repetition_penalty=1.3, frequency_penalty=0.4)
    req = _request(engine, "s", max_new=8, logprobs=4, sampling=sampling)
    done = _serve(engine, [req])[0][0][-1]
    with torch.no_grad():
        logits = hf(torch.tensor([[*req.prompt_ids, *done.token_ids]])).logits[0].float()
    prompt = len(req.prompt_ids)
    for k, (token, entry) in enumerate(zip(done.token_ids, done.logprobs, strict=True)):
        row = _row(0, req.prompt_ids, done.token_ids[:k], sampling)
        _check(entry, torch.log_softmax(_reference(logits[prompt - 1 + k], row), dim=-1), token, 4)
    assert any(e.rank > 1 for e in done.logprobs)  # sampled at 1.5: not always the likeliest


def test_prompt_logprobs_from_a_prefill_alone_in_chunks(engine, hf):
    """engine.prefill runs the prompt in column chunks of 8: every chunk's positions are scored."""
    prompt = tuple(engine.encode(PROMPT + " a long enough prompt to need three chunks"))
    from loraserve.scheduler.blocks import BlockManager

    manager = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
    tables = [manager.admit("x", prompt), manager.admit("x", prompt[:5])]
    rows = [Row(0, BASE, tuple(tables[0].blocks), prompt, [], SamplingParams(), prompt_logprobs=1, logprobs=0),
            Row(1, BASE, tuple(tables[1].blocks), prompt[:5], [], SamplingParams())]
    results = asyncio.run(engine.prefill(rows))
    lp = _hf_logprobs(hf, list(prompt))
    assert len(results[0].prompt_logprobs) == len(prompt) - 1 and results[1].prompt_logprobs == ()
    for p, entry in enumerate(results[0].prompt_logprobs):
        _check(entry, lp[p], prompt[p + 1], 1)
    _check(results[0].logprob, lp[-1], results[0].token_id, 0)
    assert results[1].logprob is None


def test_score_only_answers_its_prompts_logprobs_and_generates_nothing(engine, hf):
    req = _request(engine, "s", max_new=1, score_only=True)
    (events,), _ = _serve(engine, [req])
    (completion,) = events  # no delta: nothing generated
    assert (completion.text, completion.output_tokens, completion.token_ids) == ("", 0, ())
    assert completion.finish_reason is FinishReason.LENGTH and completion.logprobs is None
    lp = _hf_logprobs(hf, list(req.prompt_ids))
    assert len(completion.prompt_logprobs) == len(req.prompt_ids)
    for p, entry in enumerate(completion.prompt_logprobs[1:]):
        _check(entry, lp[p], req.prompt_ids[p + 1], 0)


def test_prompt_logprobs_bypass_the_prefix_cache(engine, hf):
    """Positions a shared prefix holds are not computed again: a request asking for prompt
    logprobs takes no shared block, and so scores every position."""
    plain = _request(engine, "a", PROMPT + " a prompt of three blocks at least", max_new=2)
    scored = replace(plain, request_id="b", prompt_logprobs=0)
    events, _ = _serve(engine, [plain, scored, plain], one_by_one=True)
    first, second, third = (e[-1] for e in events)
    assert third.cached_tokens >= 16 and second.cached_tokens == 0
    lp = _hf_logprobs(hf, list(plain.prompt_ids))
    assert [e.logprob for e in second.prompt_logprobs[1:]] == pytest.approx(
        [float(lp[p, t]) for p, t in enumerate(plain.prompt_ids[1:])], abs=1e-4)
    assert first.token_ids == second.token_ids == third.token_ids


def test_min_new_tokens_holds_eos_and_stop_sequences_off(engine, demo_dir):
    """The legal adapter ends this answer with EOS after a few tokens: with min_new_tokens it
    cannot, and a stop sequence met before them does not end it either."""
    legal = demo_ref(demo_dir, "legal")
    free = GenerationRequest("f", legal, tuple(engine.encode("Hello there")), 40)
    short = _serve(engine, [free])[0][0][-1]
    assert short.finish_reason is FinishReason.EOS and short.output_tokens < 20
    held = replace(free, min_new_tokens=short.output_tokens + 5)
    long = _serve(engine, [held])[0][0][-1]
    assert long.output_tokens >= held.min_new_tokens and long.text.startswith(short.text)
    assert not set(long.token_ids[:held.min_new_tokens]) & engine.eos_token_ids
    stop = replace(free, stop_sequences=(short.text[2:5],))
    cut = _serve(engine, [stop])[0][0][-1]
    assert cut.finish_reason is FinishReason.STOP_SEQUENCE and cut.output_tokens < short.output_tokens
    late = _serve(engine, [replace(stop, min_new_tokens=cut.output_tokens + 2)])[0][0][-1]
    assert late.output_tokens >= cut.output_tokens + 2 and late.text.startswith(short.text[:5])


def test_penalised_logprob_rows_answer_in_a_batch_what_they_answer_alone(engine, demo_dir):
    """Tokens exactly, logprobs to float32 rounding (without --deterministic a batch may change a
    row's float sums; tests/test_isolation.py), and across adapters."""
    legal = demo_ref(demo_dir, "legal")
    reqs = [_request(engine, "p", max_new=8, logprobs=2, sampling=SamplingParams(repetition_penalty=1.4,
                                                                                   frequency_penalty=0.3)),
            _request(engine, "q", "Hello there", max_new=8, adapter=legal, logprobs=1,
                     sampling=SamplingParams(temperature=0.9, presence_penalty=0.8, seed=3)),
            _request(engine, "r", "Question: Why?\nAnswer:", max_new=8)]
    alone = [_serve(engine, [r])[0][0][-1] for r in reqs]
    together, _ = _serve(engine, reqs)
    for a, t in zip(alone, (e[-1] for e in together), strict=True):
        assert t.token_ids == a.token_ids and t.text == a.text
        if a.logprobs is not None:
            assert [x.logprob for x in t.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-4)
    plain = _serve(engine, [_request(engine, "u", max_new=8)])[0][0][-1]
    assert plain.token_ids != alone[0].token_ids  # the penalties did change the answer


def test_deterministic_rows_give_the_same_tokens_and_logprobs_in_any_batch(demo_dir):
    eng = TorchEngine(EngineConfig(demo_dir / "base", device="cpu", dtype="bfloat16", max_rows=8,
                                   max_model_len=160, kv_block_size=8, deterministic=True))
    asyncio.run(eng.start())
    try:
        reqs = [_request(eng, "p", max_new=6, logprobs=2, prompt_logprobs=1,
                         sampling=SamplingParams(repetition_penalty=1.3, temperature=0.8, seed=1)),
                _request(eng, "q", "Hello there", max_new=6, adapter=demo_ref(demo_dir, "medical"),
                         sampling=SamplingParams(frequency_penalty=0.5), logprobs=0),
                _request(eng, "r", "Question: Why?\nAnswer:", max_new=6, prompt_logprobs=0)]
        alone = [_serve(eng, [r], reserve_kv=True)[0][0][-1] for r in reqs]
        together = [e[-1] for e in _serve(eng, reqs, reserve_kv=True)[0]]
    finally:
        asyncio.run(eng.close())
    for a, t in zip(alone, together, strict=True):
        assert (t.token_ids, t.logprobs, t.prompt_logprobs) == (a.token_ids, a.logprobs, a.prompt_logprobs)


class _Poisoning(TorchEngine):
    """The row whose prompt is `poison` gets non-finite scores (`raising` False: it fails alone)
    or makes its whole step raise (True: the scheduler retries halves), in every step it is in."""

    poison: tuple[int, ...] = ()
    raising = False

    def _forward(self, rows, ids, positions, ctx, *rest):
        logits = super()._forward(rows, ids, positions, ctx, *rest)
        bad = [i for i, r in enumerate(rows) if r.prompt_ids == self.poison]
        if bad and self.raising:
            raise RuntimeError("a kernel failed")
        if bad and logits.dim() == 2 and logits.shape[0] == len(rows):
            logits[bad] = float("nan")
        return logits


@pytest.mark.parametrize("raising", [False, True], ids=["non-finite", "raising"])
def test_a_failing_row_leaves_the_others_logprobs_untouched(demo_dir, raising):
    """Beside a row that fails (alone, or by failing its step: then its halves are retried),
    the others' tokens, logprobs and prompt logprobs are what they are alone, none twice."""
    eng = _Poisoning(EngineConfig(demo_dir / "base", device="cpu", max_rows=8, max_model_len=160, kv_block_size=8))
    eng.raising = raising
    asyncio.run(eng.start())
    try:
        eng.poison = tuple(eng.encode("Question: Why is this poisoned?\nAnswer:"))
        victims = [_request(eng, "v", max_new=5, logprobs=2, prompt_logprobs=1),
                   _request(eng, "w", "Hello there", max_new=5, logprobs=0, prompt_logprobs=0,
                            sampling=SamplingParams(presence_penalty=0.5))]
        alone = [_serve(eng, [r])[0][0][-1] for r in victims]
        poisoned = GenerationRequest("x", BASE, eng.poison, 5, logprobs=1, prompt_logprobs=1)
        events, stats = _serve(eng, [poisoned, *victims])
    finally:
        asyncio.run(eng.close())
    assert stats.failed == 1 and (stats.failed_splits > 0) == raising
    assert events[0][-1].reason == ("GENERATION_FAILED" if raising else "NON_FINITE_LOGITS")
    for v, a, deltas in zip(victims, alone, events[1:], strict=True):
        t = deltas[-1]
        assert t.token_ids == a.token_ids and len(t.logprobs) == len(a.logprobs)
        assert [x.logprob for x in t.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-4)
        assert len(t.prompt_logprobs) == len(a.prompt_logprobs) == len(v.prompt_ids)
        assert [x.logprob for x in t.prompt_logprobs[1:]] == pytest.approx(
            [x.logprob for x in a.prompt_logprobs[1:]], abs=1e-4)


# -- the scheduler's side, against a scripted engine ------------------------------------------


def test_prompt_logprobs_survive_a_preemption_once_and_tokens_reach_the_stream():
    """Preempted requests re-prefill prompt + generated: their prompt logprobs stay those of the
    first admission, each exactly once, and their rows ask for none again."""
    from test_scheduler import ScriptedEngine, ref, run

    class Scoring(ScriptedEngine):
        """Prompt token p + 1 'scores' -(p + 1) at the position before it; chosen tokens -1."""

        asked: list[tuple[int, int | None, int]] = []  # (seq, prompt_logprobs asked, cached) per prefill row

        async def prefill(self, rows):
            results = await super().prefill(rows)
            out = []
            for r, res in zip(rows, results, strict=True):
                self.asked.append((r.seq_id, r.prompt_logprobs, r.cached))
                end = min(r.upto or len(r.context), len(r.prompt_ids) - 1)
                scores = tuple(TokenLogprob(r.prompt_ids[p + 1], -(p + 1.0)) for p in range(r.cached, end)) \
                    if r.prompt_logprobs is not None else ()
                out.append(StepResult(res.seq_id, res.token_id, prompt_logprobs=scores,
                                      logprob=TokenLogprob(res.token_id, -1.0) if r.logprobs is not None else None))
            return out

        async def decode(self, rows):
            return [StepResult(r.seq_id, r2.token_id, logprob=TokenLogprob(r2.token_id, -1.0))
                    for r, r2 in zip(rows, await super().decode(rows), strict=True)]

    engine = Scoring()
    engine.kv_blocks = 10  # as in tests/test_scheduler.py: three requests of 5 blocks preempt each other
    names = ["abcdefghijklmnop", "qrstuvwxyzabcdef", "ghijklmnopqrstuv"]
    prompt = (5, 6, 7, 8, 9)

    async def scenario(s):
        reqs = [GenerationRequest(f"r{i}", ref(n), prompt, 40, prompt_logprobs=0, logprobs=0)
                for i, n in enumerate(names)]
        tickets = [s.submit(r) for r in reqs]
        out = []
        for t in tickets:
            out.append([item async for item in t.events()])
        return out, s.stats

    events, stats = run(engine, scenario, limits=BatchLimits(max_num_batched_tokens=6))
    assert stats.preemptions > 0
    want = (TokenLogprob(5, None), *(TokenLogprob(prompt[p + 1], -(p + 1.0)) for p in range(4)))
    for name, deltas in zip(names, events, strict=True):
        done = deltas[-1]
        assert done.text == name and done.prompt_logprobs == want
        assert done.token_ids == (*map(ord, name), 0) == tuple(t for d in deltas[:-1] for t in d.token_ids)
        assert len(done.logprobs) == len(done.token_ids) == sum(len(d.logprobs) for d in deltas[:-1])
        assert all(isinstance(d, TextDelta) for d in deltas[:-1])
    # Rows ask only while prompt positions are unscored; the re-prefills ask for none.
    assert all(c < len(prompt) - 1 for _, p, c in engine.asked if p is not None)
    assert len({seq for seq, p, _ in engine.asked if p is not None}) == 3
    assert any(p is None for _, p, _ in engine.asked)


def test_score_only_needs_no_block_past_its_prompt():
    from test_scheduler import ScriptedEngine, ref, run

    engine = ScriptedEngine()
    engine.kv_blocks = 2  # 8 positions: a 7-token prompt and nothing more

    async def scenario(s):
        return await s.submit(GenerationRequest("s", ref("ab"), tuple(range(10, 17)), 100, score_only=True,
                                                prompt_logprobs=1)).result()

    done = run(engine, scenario, reserve_kv=True)
    assert (done.output_tokens, done.text, done.token_ids, done.logprobs) == (0, "", (), None)
    assert done.prompt_logprobs[0] == TokenLogprob(10, None) and len(done.prompt_logprobs) == 7
