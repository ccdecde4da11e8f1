"""Stepping: a step's rows in, one forward, sampling, and the step's one host transfer out.

A step is a function of the rows it is given (the scheduler's, whole: no batch lives here): it
writes only into those rows' KV blocks (positions their lengths do not cover yet) and returns
one result per row, or raises having changed nothing another row reads. The scheduler retries
subsets on failure, so every stage below may raise; none leaves anything behind. Each row reads
its adapter's slot in place (runner/adapters.py, runner/lora.py).
"""

from __future__ import annotations

import itertools
import logging

import torch

from loraserve.runner.adapters import AdapterSlots
from loraserve.runner.config import EngineConfig
from loraserve.runner.graphs import CaptureFailed, DecodeGraphs
from loraserve.runner.guided import Guide
from loraserve.runner.kvpool import KVPool, MixedContext, decode_view, plan_prefill, prefill_context
from loraserve.runner.logprobs import Logprobs
from loraserve.runner.lora import RowSlots
from loraserve.runner.sampling import Processor, Sampler
from loraserve.runner.staging import Staging, decode_rows, decode_views
from loraserve.scheduler.engine import Row, StepResult
from loraserve.scheduler.errors import GenerationFailed, OutOfMemory

log = logging.getLogger(__name__)


def _fetch(tensor: torch.Tensor) -> list:
    """The one device-to-host transfer of a step (a sync on cuda): its [2, B] tokens and finite
    flags, or, when a row asks for logprobs, those and the logprobs packed flat as float64
    (runner/logprobs.py). Nothing else in a step reads a device value on the host
    (tests/test_syncs.py)."""
    return tensor.tolist()


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether each row's scores are all finite. 0 x a finite score is 0, 0 x inf or NaN
    is NaN, so a row sums to 0 exactly when all its scores are finite (no [B, vocab] bool tensor:
    isfinite().all() took 2-4x as long on a CPU)."""
    return (logits * 0).sum(dim=-1) == 0


def _prompt_positions(row: Row) -> tuple[int, int]:
    """(first, count): the context positions of this prefill chunk whose scores predict a prompt
    token (position p predicts token p + 1) when the row asks for prompt logprobs, else (0, 0)."""
    if row.prompt_logprobs is None:
        return 0, 0
    end = min(row.upto or len(row.context), len(row.prompt_ids) - 1)
    return row.cached, max(end - row.cached, 0)


class Steps:
    """The step half of TorchEngine (runner/engine.py), which builds what is declared here when
    it loads and runs these on its engine thread."""

    cfg: EngineConfig
    _model: torch.nn.Module
    _device: torch.device
    _kernel: str
    _pool: KVPool
    _adapters: AdapterSlots
    _rows: RowSlots
    _graphs: DecodeGraphs | None
    _inputs: Staging  # eager decode's tokens, lengths, slots and block tables
    _prefill_inputs: Staging  # a prefill's or mixed step's (PrefillPlan.values and more)
    _sampler: Sampler
    _processor: Processor
    _logprobs: Logprobs
    _guide: Guide
    _pad: int

    def _uncaptured(self) -> DecodeGraphs | None:
        """After a failed capture: the graphs' bucketed step without capture for FlexAttention (one
        compile per bucket, not per batch size), plain eager decode for the reference kernel."""
        if self._kernel != "flex":
            return None
        return DecodeGraphs(self._model_step, self._pool, self._pad, capture=False, max_rows=self.cfg.max_rows,
                            kernel=self._kernel)

    def _typed(self, step, rows):
        """torch's CUDA and CPU out-of-memory errors become OutOfMemory (the scheduler splits the
        rows and retries); what was allocated for the failed step is released."""
        try:
            if self.cfg.deterministic:  # each row alone: no other row can enter its sums
                return [result for row in rows for result in step([row])]
            return step(rows)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"not enough {self._device.type} memory for this batch step") from exc

    def _step(self, rows: list[Row]) -> list[StepResult]:
        """Rows that prefill a chunk (Row.prefill) and rows that decode: one forward when both are
        there; decode alone goes through the decode graphs."""
        chunks = sum(r.prefill for r in rows)
        if not chunks:
            return self._decode(rows)
        return self._prefill(rows) if chunks == len(rows) else self._mixed(rows)

    @torch.inference_mode()
    def _prefill(self, rows: list[Row]) -> list[StepResult]:
        """Each row computes its context (prompt, and what it generated before a preemption) past the
        positions a shared prefix already holds; its next token comes from the last one."""
        fed, tables, cached = [list(r.fed) for r in rows], [list(r.blocks) for r in rows], [r.cached for r in rows]
        width = max(map(len, fed))
        wanted = [_prompt_positions(r) for r in rows]
        picked, places = [], []
        # Long prompts run in chunks of columns, so activations and masks stay bounded whatever the
        # prompt's length; each chunk writes its keys into the pool, where the next reads them.
        # Left padding puts every row's last token in the last column (logits_to_keep=1); rows
        # asking for prompt logprobs keep the columns from the first of theirs on ([B, K, vocab]).
        chunk = self.cfg.prefill_chunk_tokens or width
        for begin in range(0, width, chunk):
            end = min(begin + chunk, width)
            plan = plan_prefill(tables, cached, fed, self._pool.scratch, begin, end)
            spans = []  # asked positions within this chunk: (row, first column, end column, first position)
            for i, (first, count) in enumerate(wanted):
                column = width - len(fed[i]) + first - cached[i]  # row i's position `first` sits there
                lo, hi = max(column, begin), min(column + count, end)
                if lo < hi:
                    spans.append((i, lo - begin, hi - begin, first + lo - column))
            kept = end - begin - min((lo for _, lo, _, _ in spans), default=end - begin - 1)
            flat = [i * kept + c - (end - begin - kept) for i, lo, hi, _ in spans for c in range(lo, hi)]
            dev = self._prefill_inputs.send([*plan.values, *flat])
            ctx, ids, positions = prefill_context(self._pool, plan, dev[:len(plan.values)])
            logits = self._forward(rows, ids, positions, ctx, None, kept if spans else None)
            if flat:
                picked.append(logits.flatten(0, 1).index_select(0, dev[len(plan.values):]))
                places += [(i, rows[i].prompt_ids[p + 1]) for i, lo, hi, p0 in spans for p in range(p0, p0 + hi - lo)]
                logits = logits[:, -1]
        return self._results(rows, logits, (torch.cat(picked), places) if picked else None)

    @torch.inference_mode()
    def _mixed(self, rows: list[Row]) -> list[StepResult]:
        """Decode rows and prefill chunks in one forward (kvpool.MixedContext): the step's tokens
        packed into one sequence, its inputs sent in one copy; the logits kept are each decode
        row's and each chunk's last token's."""
        decoding, chunks = [r for r in rows if not r.prefill], [r for r in rows if r.prefill]
        n, fed = len(decoding), [list(r.fed) for r in chunks]
        plan = plan_prefill([list(r.blocks) for r in chunks], [r.cached for r in chunks], fed, self._pool.scratch)
        lengths = [r.length for r in decoding]
        slots = [self._adapters.ready_slot(r.adapter) for r in decoding]
        for row, tokens in zip(chunks, fed):
            slots += [self._adapters.ready_slot(row.adapter)] * len(tokens)
        ends = list(itertools.accumulate(map(len, fed), initial=n))[1:]
        # Columns of prompt positions asked for, after each row's own: chunk j's position p sits at
        # column ends[j] - len(fed[j]) + p - cached.
        asked, places = [], []
        for j, row in enumerate(chunks):
            first, count = _prompt_positions(row)
            column = ends[j] - len(fed[j]) + first - row.cached
            asked += range(column, column + count)
            places += [(n + j, t) for t in row.prompt_ids[first + 1:first + 1 + count]]
        flat, width = decode_rows([r.generated[-1] for r in decoding], lengths, [0] * n,
                                  [r.blocks for r in decoding], 0, self._pad, self._pool.scratch)
        packed = [*flat, *plan.values, *slots, *range(n), *(e - 1 for e in ends), *asked]
        dev = self._prefill_inputs.send(packed)
        inputs, table_t = decode_views(dev[:len(flat)], n, width)
        dev = dev[len(flat):]
        ctx, _, _ = prefill_context(self._pool, plan, dev[:len(plan.values)])
        slots_t, keep = dev[len(plan.values):].split([len(slots), n + len(chunks) + len(asked)])
        ids = torch.cat((inputs[0], dev[:plan.tokens])).unsqueeze(0)  # [1, N]
        positions = torch.cat((inputs[1], dev[3 * plan.tokens:4 * plan.tokens])).unsqueeze(0)
        # The decode rows' keys are gathered (the reference read), as a prefill's are: FlexAttention
        # compiles per row count, which the graphs' buckets bound for decode steps but not here.
        ctx = MixedContext(decode_view(self._pool, table_t.to(torch.int32), inputs[1], "reference", max(lengths) + 1),
                           ctx, n)
        logits = self._forward([*decoding, *chunks], ids, positions, ctx, (tuple(slots), slots_t), keep)
        prompt = (logits[n + len(chunks):], places) if asked else None
        results = dict(zip((r.seq_id for r in (*decoding, *chunks)),
                           self._results([*decoding, *chunks], logits[:n + len(chunks)], prompt)))
        return [results[r.seq_id] for r in rows]

    @torch.inference_mode()
    def _decode(self, rows: list[Row]) -> list[StepResult]:
        tokens = [r.generated[-1] for r in rows]
        lengths = [r.length for r in rows]
        tables = [r.blocks for r in rows]
        lora = [self._adapters.ready_slot(r.adapter) for r in rows]
        if self._graphs is not None:
            try:
                return self._results(rows, self._graphs.run(tokens, lengths, tables, lora))
            except CaptureFailed as exc:  # e.g. quantized kernels that cannot be captured: uncaptured from now on
                log.warning("%s; decode runs eagerly from now on (as with --no-cuda-graphs)", exc)
                self._graphs = self._uncaptured()
                if self._graphs is not None:
                    return self._results(rows, self._graphs.run(tokens, lengths, tables, lora))
        # One copy in (runner/staging.py): every per-row input, then views of it on the device.
        flat, width = decode_rows(tokens, lengths, lora, tables, 0, self._pad, self._pool.scratch)
        packed, table_t = decode_views(self._inputs.send(flat), len(rows), width)
        ids, lengths_t, slots = packed[0].unsqueeze(1), packed[1], packed[2]
        ctx = decode_view(self._pool, table_t.to(torch.int32), lengths_t, self._kernel, max(lengths) + 1)
        return self._results(rows, self._forward(rows, ids, lengths_t.unsqueeze(1), ctx, (tuple(lora), slots)))

    def _forward(self, rows: list[Row], ids: torch.Tensor, positions: torch.Tensor, ctx,
                 slots: tuple[tuple[int, ...], torch.Tensor] | None = None, keep: torch.Tensor | int | None = None):
        """[B, vocab] float32 logits of each row's next token. `slots`: the step's LoRA slot per row
        (per token, packed), and the same already on the device (from the step's one copy in).
        `keep`: a packed step's columns whose logits are kept, or a number of each row's last
        columns ([B, keep, vocab]); None: each row's last."""
        lora, on_device = slots or (tuple(self._adapters.ready_slot(r.adapter) for r in rows), None)
        if on_device is None or self._rows.kernel != "triton":  # the grouped path groups rows from the host tuple
            installed = self._rows.using(lora, self._device)
        else:
            installed = self._rows.installed(on_device if any(lora) else None)
        with installed:
            return self._call(ids.to(self._device), positions.to(self._device), ctx, keep).float()

    def _model_step(self, ids: torch.Tensor, positions: torch.Tensor, ctx, lora: torch.Tensor | None):
        """A captured decode step: `lora` is the graphs' persistent [B] slot buffer."""
        with self._rows.installed(lora):
            return self._call(ids, positions, ctx)

    def _call(self, ids: torch.Tensor, positions: torch.Tensor, ctx, keep: torch.Tensor | int | None = None
              ) -> torch.Tensor:
        """[B, vocab] logits of each row's next token (the attention takes its mask from ctx);
        `keep` as in _forward."""
        out = self._model(input_ids=ids, position_ids=positions, use_cache=False,
                          logits_to_keep=1 if keep is None else keep, kv_step=ctx)
        if keep is None:
            return out.logits[:, -1, :]
        return out.logits if isinstance(keep, int) else out.logits[0]

    def _results(self, rows: list[Row], logits: torch.Tensor,
                 prompt: tuple[torch.Tensor, list[tuple[int, int]]] | None = None) -> list[StepResult]:
        """`prompt`: the scores of prompt positions rows asked logprobs for, and per position
        (row index, the token it predicts), in each row's order. Guided rows' masks (runner/guided.py)
        come first, so penalties, the choice and the logprobs all see the grammar's tokens only."""
        sampled, masked, faults = self._guide.constrain(rows, logits)
        scores = self._processor(masked, sampled)
        tokens, finite = self._sample(sampled, scores), _finite(logits)
        if prompt is None and all(r.logprobs is None for r in rows):
            tokens, finite = _fetch(torch.stack((tokens, finite.long())))
            chosen, prompts = [None] * len(rows), [()] * len(rows)
        else:
            packed, layout = self._logprobs.pack(scores, tokens, rows, prompt)
            values = _fetch(torch.cat((tokens.double(), finite.double(), packed)))
            b = len(rows)
            tokens, finite = [int(t) for t in values[:b]], values[b:2 * b]
            chosen, prompts = self._logprobs.unpack(values[2 * b:], tokens, rows, layout)
        results = [StepResult(row.seq_id, token, logprob=lp, prompt_logprobs=tuple(pl)) if ok else StepResult(
                       row.seq_id, error=GenerationFailed("the model produced non-finite scores for this request",
                                                          reason="NON_FINITE_LOGITS", adapter_id=row.adapter.key))
                   for row, token, ok, lp, pl in zip(rows, tokens, finite, chosen, prompts, strict=True)]
        return [StepResult(r.seq_id, error=faults[r.seq_id]) if r.seq_id in faults else r for r in results]

    def _sample(self, rows: list[Row], scores: torch.Tensor) -> torch.Tensor:
        """[B] token ids, on the device (runner/sampling.py: no host round trip)."""
        return self._sampler(scores, [r.sampling for r in rows], [len(r.generated) for r in rows])
