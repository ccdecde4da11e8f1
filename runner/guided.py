"""Guided decoding: a row with a response_format only ever chooses a token that keeps its output a
prefix of JSON valid under that format, and EOS once the JSON is complete (docs/api.md "Structured
output").

xgrammar compiles each distinct format once into a pushdown automaton with token masks
precomputed for the tokenizer (the most recent formats are kept here, more in the compiler's own
bounded cache); each sequence walks it with its own GrammarMatcher. The
engine keeps no batch, so matchers are a cache keyed by seq_id that each step reconciles with
Row.generated, the truth: the tokens it holds that the matcher has not consumed are fed to it
first (a retried step finds none, so no matcher advances twice), and a matcher that has consumed
something else is rebuilt by replaying them. Sequences that stop stepping (finished, failed,
preempted) are dropped least recently stepped first, past a few per row of a step; a preempted
one that resumes after that is replayed.

Per step, a guided row's allowed tokens are filled on the host into one int32 bitmask (a bit per
token), copied in once and applied on the device to a copy of the step's logits (the unguided
rows' bits all set), before any penalty, temperature or argmax. A step with no guided row does
none of this.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import xgrammar as xgr

from loraserve.scheduler.engine import Row
from loraserve.scheduler.errors import GenerationFailed, InvalidArgument, LoraServeError
from loraserve.scheduler.types import ResponseFormat

SCHEMA_FIELD = "response_format.json_schema"
MAX_SCHEMA_CHARS = 65536
ANY_OBJECT = '{"type": "object"}'
CACHE_BYTES = 256 * 2**20
"""The compiler's cache of compiled formats (their token masks grow with the vocabulary)."""
_BOUNDED_CHARACTER = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]')
"""xgrammar 0.2.9 writes a string with minLength or maxLength as repetitions of the first class,
which admits raw control characters, not JSON (mlc-ai/xgrammar#800, PR #880); its other strings'
characters exclude them, as the second does. (Escapes stay unreachable in such strings: still JSON.)"""
GRAMMARS_KEPT = 64
"""Compiled formats kept at hand, most recently asked for (the compiler's own cache holds more)."""
KEPT_PER_ROW = 4
"""Matchers kept per row a step can hold (max_rows): waiting and finished sequences' beyond that go."""


@dataclass
class _Track:
    """A sequence's matcher and what of its generated tokens it has consumed."""

    fmt: ResponseFormat
    matcher: xgr.GrammarMatcher
    consumed: int = 0
    last: int = -1


class Guide:
    """The engine's guided decoding: `check` at the edge, `constrain` in each step (engine thread)."""

    def __init__(self, tokenizer, vocab: int, eos: frozenset[int], rows: int):
        """`vocab`: the logits' width, which may exceed the tokenizer's (padded embeddings)."""
        self._tokenizer, self._vocab, self._eos, self._rows = tokenizer, vocab, eos, rows
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None  # built at the first format seen
        self._grammars: OrderedDict[ResponseFormat, xgr.CompiledGrammar] = OrderedDict()  # least recent first
        self._tracks: OrderedDict[int, _Track] = OrderedDict()  # seq_id -> matcher, least recently stepped first
        self._bitmask: torch.Tensor | None = None  # [rows, ceil(vocab / 32)] int32, host, from the first guided step

    def check(self, fmt: ResponseFormat) -> None:
        """Compiles `fmt` (kept for its requests' steps), or raises InvalidArgument naming the schema."""
        if fmt.json_schema is not None and len(fmt.json_schema) > MAX_SCHEMA_CHARS:
            raise InvalidArgument(SCHEMA_FIELD, f"is longer than {MAX_SCHEMA_CHARS} characters")
        try:
            self._compile(fmt)
        except RuntimeError as exc:  # xgrammar reports schemas it cannot parse or convert so
            raise InvalidArgument(SCHEMA_FIELD, f"cannot be enforced: {_why(exc)}") from None

    def _compile(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        """`fmt`'s grammar: kept for the formats asked for most recently, else converted (a fraction
        of a millisecond) and compiled (the compiler's cache holds what it compiled before)."""
        with self._lock:
            compiled = self._grammars.get(fmt)
            if compiled is not None:
                self._grammars.move_to_end(fmt)
                return compiled
        # No free whitespace: a greedy model could otherwise pad forever between tokens of JSON.
        # A schema's objects take only the properties it names (strict); any object takes any.
        grammar = xgr.Grammar.from_json_schema(ANY_OBJECT if fmt.json_schema is None else fmt.json_schema,
                                               any_whitespace=False, strict_mode=fmt.json_schema is not None)
        compiled = self._grammar_compiler().compile_grammar(str(grammar).replace(*_BOUNDED_CHARACTER))
        with self._lock:
            self._grammars[fmt] = compiled
            while len(self._grammars) > GRAMMARS_KEPT:
                self._grammars.popitem(last=False)
        return compiled

    def _grammar_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:  # the edge's threads and the engine's may ask first together
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab,
                                                          stop_token_ids=sorted(self._eos))
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
            return self._compiler

    def constrain(self, rows: Sequence[Row], logits: torch.Tensor
                  ) -> tuple[Sequence[Row], torch.Tensor, dict[int, LoraServeError]]:
        """The rows to sample (a guided row's min_new_tokens lifted: its grammar alone decides when
        EOS may come), the [B, V] logits to sample from (a masked copy when any row is guided) and
        the guided rows whose matcher failed (seq_id -> error; those rows' logits are left as
        they were, their results are the error)."""
        guided = [i for i, r in enumerate(rows) if r.response_format is not None and not _midway(r)]
        if not guided:
            return rows, logits, {}
        bitmask = self._mask_rows(len(rows), logits.device.type == "cuda")
        faults: dict[int, LoraServeError] = {}
        for i in guided:
            row = rows[i]
            try:
                track = self._track(row)
                if track.matcher.is_terminated():  # EOS came and the row goes on (ignore_eos): EOS again
                    bitmask[i].zero_()
                    for token in self._eos:
                        bitmask[i, token // 32] |= _bit(token)
                else:
                    track.matcher.fill_next_token_bitmask(bitmask, i)
            except Exception as exc:  # this row's grammar only: the others go on
                self._tracks.pop(row.seq_id, None)
                bitmask[i].fill_(-1)
                faults[row.seq_id] = exc if isinstance(exc, LoraServeError) else GenerationFailed(
                    f"guided decoding failed for this request ({type(exc).__name__})", reason="GUIDED_DECODING_FAILED")
        self._forget()
        masked = logits.clone()
        # The buffer is refilled only after the step's one transfer out, so its last copy in is done.
        xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device, non_blocking=True), vocab_size=self._vocab)
        lifted = list(rows)
        for i in guided:
            if rows[i].min_new_tokens:
                lifted[i] = replace(rows[i], min_new_tokens=0)
        return lifted, masked, faults

    def _mask_rows(self, n: int, pin: bool) -> torch.Tensor:
        """The first `n` rows of the bitmask, every bit set (an unguided row keeps all its tokens);
        page-locked for a cuda device, so its copy in is asynchronous."""
        if self._bitmask is None or self._bitmask.shape[0] < n:
            shape = xgr.get_bitmask_shape(max(n, self._rows), self._vocab)
            self._bitmask = torch.empty(shape, dtype=xgr.bitmask_dtype, pin_memory=pin)
        return self._bitmask[:n].fill_(-1)

    def _track(self, row: Row) -> _Track:
        """The row's matcher, having consumed exactly row.generated."""
        generated, track = row.generated, self._tracks.get(row.seq_id)
        # A seq_id is never reused and its generated tokens only grow, so the length and last
        # token consumed tell a matcher that is behind (to feed) from one that went elsewhere.
        if (track is None or track.fmt != row.response_format or len(generated) < track.consumed
                or (track.consumed and generated[track.consumed - 1] != track.last)):
            track = _Track(row.response_format, xgr.GrammarMatcher(self._compile(row.response_format)))
            self._tracks[row.seq_id] = track
        self._tracks.move_to_end(row.seq_id)
        for token in generated[track.consumed:]:
            ended = track.matcher.is_terminated() and token in self._eos
            if not ended and not track.matcher.accept_token(token):
                raise GenerationFailed(f"token {token} at position {track.consumed} of this request's output "
                                       f"breaks its response_format", reason="GUIDED_DECODING_FAILED")
            track.consumed, track.last = track.consumed + 1, token
        return track

    def _forget(self) -> None:
        while len(self._tracks) > KEPT_PER_ROW * self._rows:
            self._tracks.popitem(last=False)


def _midway(row: Row) -> bool:
    """A prefill chunk short of the context's end: its token is thrown away, so no mask for it."""
    return row.prefill and 0 < row.upto < len(row.prompt_ids) + len(row.generated)


def _bit(token: int) -> int:
    """Token's bit in its int32 word, as a signed value (bit 31 is the sign)."""
    bit = 1 << (token % 32)
    return bit - (1 << 32) if bit >= 1 << 31 else bit


_LOCATION = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: .*? is false: )?")


def _why(exc: Exception) -> str:
    """xgrammar's message without its timestamp, source location and assertion."""
    text = str(exc).strip()
    return _LOCATION.sub("", text.splitlines()[0]) if text else type(exc).__name__
