"""Next-token choice for a whole step at once: greedy rows by argmax, sampled rows by Gumbel-max.

Sampled rows need no generator state: a row's noise for its n-th generated token is a hash of
(seed, n, token id), computed on the device for all rows together. So a seeded request samples
the same tokens whatever else is in its batch, on any device, and a retried step repeats itself.

Everything runs on the device with no round trip to the host: the rows' parameters are packed on
the host into one buffer and copied in once, asynchronously (runner/staging.py), and what depends
on them is decided from the host's own copy, never from a device value (no `.any()` on a
device tensor). Each row's work follows what it asks for, rows asking alike drawn together:
greedy rows take the argmax and nothing else; rows with a top_p below 1 sort the vocabulary (the
cumulative mass needs the order); rows with a top_k alone take `topk` of the widest k among them,
the noise hashed for those candidates only; rows with neither add noise to every score and take
the largest. Whichever the way, a row draws the largest of score / temperature + noise over the
tokens its top_k and top_p keep, the token the full sort drew before (only between equal scores,
at the top_k boundary or at the top, may another of the equals win: the sort's order among
equals was arbitrary too), and what its neighbours ask for changes nothing.

Normalised rather than refused (validation has already refused non-finite and negative values):
a temperature below MIN_TEMPERATURE is sampled at MIN_TEMPERATURE (dividing by 1e-38 overflows
to inf; at 1e-4 the distribution is already one-hot to float precision unless logits tie), and
top_k above the vocabulary means the whole vocabulary.

Before any of that, `Processor` turns the model's logits into the scores a row chooses from:
repetition_penalty (vLLM's and HF's: a score of a token already in the prompt or the output is
divided by the penalty when positive, multiplied when negative), then frequency_penalty and
presence_penalty (OpenAI's: minus frequency x the token's count in the output, minus presence
once it occurs there), and EOS made impossible while a row has generated fewer than its
min_new_tokens. All penalised rows at once: their tokens, padded, go in one copy; their outputs
are counted by scatter_add into [rows, vocab], and only the scores of the tokens they hold are
read and written back (take, index_put) into one copy of the logits. A step where no row asks
copies and computes nothing. Counts are sums of ones, exact in float32 in any order, so a
penalised row's scores are the same in any batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from loraserve.runner.staging import Staging
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import SamplingParams

MIN_TEMPERATURE = 1e-4
_MASK32 = 0xFFFFFFFF
_PACKED = 8
"""Values packed per row, at most: a sampled row's index, top_k, seed (low and high 32 bits), step,
temperature and top_p, and every row's place among the sampled ones."""


class Sampler:
    """`sample` over one preallocated staging buffer (page-locked on cuda) of `rows` rows."""

    def __init__(self, device: torch.device, rows: int = 16):
        # float64 holds the integers exactly (seeds are packed as 32-bit halves, the rest is smaller).
        self._staging = Staging(rows * _PACKED, device, torch.float64)
        self._tokens: dict[int, torch.Tensor] = {}  # vocab -> the token ids' own hash, [1, vocab]

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
        """`logits` [B, V] float32 -> [B] token ids on logits' device. `steps[i]`: tokens row i has
        generated so far."""
        rows, vocab = logits.shape
        # Sampled rows in three groups, each drawn its own way: top_p (a sort), top_k alone (topk),
        # neither (the whole vocabulary). What a row asks for is known here, on the host.
        nucleus, top_k, plain = [], [], []
        for i, p in enumerate(params):
            if not p.greedy:
                (nucleus if p.top_p < 1.0 else top_k if 0 < p.top_k < vocab else plain).append(i)
        drawn = nucleus + top_k + plain
        if not drawn:
            return logits.argmax(dim=-1)
        n, a, b = len(drawn), len(nucleus), len(nucleus) + len(top_k)
        sampled = [params[i] for i in drawn]
        k = [min(p.top_k or vocab, vocab) for p in sampled]
        seeds = [p.seed or 0 for p in sampled]
        values = [*drawn, *k, *(s & _MASK32 for s in seeds), *((s >> 32) & _MASK32 for s in seeds),
                  *(steps[i] for i in drawn),
                  *(max(p.temperature, MIN_TEMPERATURE) for p in sampled), *(p.top_p for p in sampled)]
        aligned = drawn == list(range(rows))  # every row sampled, already in group order
        if not aligned:  # each row's place among the drawn ones (-1: greedy), to take their choice back
            place = [-1] * rows
            for j, i in enumerate(drawn):
                place[i] = j
            values += place
        packed = self._staging.send(values)
        idx, k_t, lo, hi, step = packed[:5 * n].view(5, n).long()
        temps, top_p = packed[5 * n:7 * n].view(2, n).float()  # rounded to float32 as torch.tensor(floats) is
        scores = (logits if aligned else logits.index_select(0, idx)) / temps.unsqueeze(1)
        h, tokens = _row_hash(lo, hi, step), self._vocab_hash(vocab, scores.device)
        parts = []
        if a:
            parts.append(_nucleus(scores[:a], k_t[:a], top_p[:a], h[:a], tokens))
        if b > a:
            parts.append(_top_k(scores[a:b], k_t[a:b], h[a:b], tokens, max(k[a:b])))
        if n > b:
            parts.append((scores[b:] + _noise(h[b:], tokens)).argmax(dim=-1))
        picked = torch.cat(parts) if len(parts) > 1 else parts[0]
        if aligned:
            return picked
        place = packed[7 * n:].long()
        return torch.where(place >= 0, picked.gather(0, place.clamp(min=0)), logits.argmax(dim=-1))

    def _vocab_hash(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[1, vocab] every token id's own hash (the same each step: kept per vocabulary size)."""
        cached = self._tokens.get(vocab)
        if cached is None:
            cached = self._tokens[vocab] = _token_hash(torch.arange(vocab, dtype=torch.int64, device=device)
                                                       ).unsqueeze(0)
        return cached


class Processor:
    """Penalties and min_new_tokens over a step's logits (see the module's docstring), through
    one staging buffer of its own."""

    def __init__(self, device: torch.device, eos: frozenset[int], rows: int = 16):
        # float64 holds the flat indices (row x vocab + token) exactly, and the penalties.
        self._staging = Staging(rows * 64, device, torch.float64)
        self._eos = sorted(eos)

    def __call__(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """`logits` [B, V] -> the scores rows choose from: `logits` itself when no row asks for a
        penalty or min_new_tokens, else a copy changed where they ask (the model's logits stay)."""
        penalised = [i for i, r in enumerate(rows) if r.sampling.penalized]
        held = [i for i, r in enumerate(rows) if len(r.generated) < r.min_new_tokens] if self._eos else []
        if not penalised and not held:
            return logits
        vocab = logits.shape[1]
        # Per penalised row, the tokens whose scores change: its output's, then (when it has a
        # repetition penalty) its prompt's, padded with a repeat of its first (the same token,
        # the same new score: written twice, alike) or, when it has none, token 0 left as it is.
        changed = [[*rows[i].generated, *(rows[i].prompt_ids if rows[i].sampling.repetition_penalty != 1.0
                                          else ())] for i in penalised]
        width, counted = max(map(len, changed), default=0), max((len(rows[i].generated) for i in penalised), default=0)
        values = [*(i * vocab + t for i in held for t in self._eos), *(bool(c) for c in changed),
                  *(rows[i].sampling.repetition_penalty for i in penalised),
                  *(rows[i].sampling.frequency_penalty for i in penalised),
                  *(rows[i].sampling.presence_penalty for i in penalised)]
        for i, tokens in zip(penalised, changed):
            values += (i * vocab + t for t in tokens)
            values += [i * vocab + (tokens[0] if tokens else 0)] * (width - len(tokens))
        for i in penalised:  # the output alone, counted: padded with `vocab`, a column dropped after
            values += rows[i].generated
            values += [vocab] * (counted - len(rows[i].generated))
        p, e = len(penalised), len(held) * len(self._eos)
        dev = self._staging.send(values)
        scores = logits.clone(memory_format=torch.contiguous_format)
        flat = scores.view(-1)
        if p:
            some = dev[e:e + p].unsqueeze(1).bool()
            rep, freq, pres = dev[e + p:e + 4 * p].view(3, p, 1).float()
            at = dev[e + 4 * p:e + p * (4 + width)].view(p, width).long()
            out = dev[e + p * (4 + width):].view(p, counted).long()
            ones = torch.ones(out.shape, device=logits.device)
            count = torch.zeros(p, vocab + 1, device=logits.device).scatter_add_(1, out, ones)
            c = count.gather(1, at % vocab)
            g = flat.take(at)
            new = torch.where(g > 0, g / rep, g * rep) - freq * c - pres * (c > 0)
            flat.index_put_((at.flatten(),), torch.where(some, new, g).flatten())
        if e:
            flat.index_fill_(0, dev[:e].long(), float("-inf"))
        return scores


def _nucleus(scores: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, h: torch.Tensor,
             tokens: torch.Tensor) -> torch.Tensor:
    """Rows with a top_p: the cumulative mass needs every kept token in order, so one sort.
    `tokens`: every token id's own hash, [1, V]."""
    vocab = scores.shape[1]
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    drop = torch.arange(vocab, device=scores.device).unsqueeze(0) >= k.unsqueeze(1)
    probs = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token once the mass before it already reaches top_p (the first always stays).
    drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
    perturbed = sorted_scores.masked_fill(drop, float("-inf")) + _noise(h, tokens.take(order))
    return order.gather(1, perturbed.argmax(dim=-1, keepdim=True)).squeeze(1)


def _top_k(scores: torch.Tensor, k: torch.Tensor, h: torch.Tensor, tokens: torch.Tensor, widest: int) -> torch.Tensor:
    """Rows with a top_k alone: `topk` of the widest k asked for (a sort's first columns, no sort),
    the noise hashed for those candidates only."""
    top, order = scores.topk(widest, dim=-1)
    drop = torch.arange(widest, device=scores.device).unsqueeze(0) >= k.unsqueeze(1)
    perturbed = top.masked_fill(drop, float("-inf")) + _noise(h, tokens.take(order))
    return order.gather(1, perturbed.argmax(dim=-1, keepdim=True)).squeeze(1)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    """`logits` [B, V] float32 -> [B] token ids. `steps[i]`: tokens row i has generated so far.
    (A Sampler of its own: the engine keeps one, whose buffers persist.)"""
    return Sampler(logits.device, len(params))(logits, params, steps)


def gumbel(seeds: Sequence[int], steps: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[n, vocab] standard Gumbel noise, a pure function of (seed, step, token id)."""
    lo = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64, device=device)
    hi = torch.tensor([(s >> 32) & _MASK32 for s in seeds], dtype=torch.int64, device=device)
    step = torch.tensor(list(steps), dtype=torch.int64, device=device)
    tokens = torch.arange(vocab, dtype=torch.int64, device=device).unsqueeze(0)
    return _noise(_row_hash(lo, hi, step), _token_hash(tokens))


def _row_hash(lo: torch.Tensor, hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[n] each row's hash of (seed, step): lo and hi are the seed's 32-bit halves."""
    h = _hash32(lo ^ _hash32(hi ^ 0x5BD1E995))
    return _hash32(h ^ _hash32(step + 0x27D4EB2F))


def _token_hash(tokens: torch.Tensor) -> torch.Tensor:
    """A token id's own hash, the noise's third input (any shape)."""
    return _hash32(tokens + 0x165667B1)


def _noise(h: torch.Tensor, token_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [n, m] of rows with hash `h` [n] at tokens whose own hash is `token_hash`."""
    bits = _hash32(h.unsqueeze(1) ^ token_hash)
    u = (bits.to(torch.float64) + 0.5) / 4294967296.0  # in (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).to(torch.float32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x < 2**32, without int64 overflow (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (a well-mixed 32-bit integer hash) on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
