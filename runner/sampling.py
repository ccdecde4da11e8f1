"""Next-token choice for a whole step at once: greedy rows by argmax, sampled rows by Gumbel-max.

Sampled rows need no generator state: a row's noise for its n-th generated token is a hash of
(seed, n, token id), computed on the device for all rows together. So a seeded request samples
the same tokens whatever else is in its batch, on any device, and a retried step repeats itself.

Normalised rather than refused (validation has already refused non-finite and negative values):
a temperature below MIN_TEMPERATURE is sampled at MIN_TEMPERATURE (dividing by 1e-38 overflows
to inf; at 1e-4 the distribution is already one-hot to float precision unless logits tie), and
top_k above the vocabulary means the whole vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch

from scheduler.types import SamplingParams

MIN_TEMPERATURE = 1e-4
_MASK32 = 0xFFFFFFFF


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    """`logits` [B, V] float32 -> [B] token ids. `steps[i]`: tokens row i has generated so far."""
    chosen = logits.argmax(dim=-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if not drawn:
        return chosen
    device = logits.device
    idx = torch.tensor(drawn, device=device)
    temps = torch.tensor([max(params[i].temperature, MIN_TEMPERATURE) for i in drawn], device=device)
    scores = logits.index_select(0, idx) / temps.unsqueeze(1)
    vocab = scores.shape[1]
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    top_k = torch.tensor([params[i].top_k or vocab for i in drawn], device=device).clamp(max=vocab)
    drop = rank >= top_k.unsqueeze(1)
    top_p = torch.tensor([params[i].top_p for i in drawn], device=device)
    if bool((top_p < 1.0).any()):
        probs = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
    noise = gumbel([params[i].seed or 0 for i in drawn], [steps[i] for i in drawn], vocab, device)
    perturbed = sorted_scores.masked_fill(drop, float("-inf")) + noise.gather(1, order)
    chosen[idx] = order.gather(1, perturbed.argmax(dim=-1, keepdim=True)).squeeze(1)
    return chosen


def gumbel(seeds: Sequence[int], steps: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[n, vocab] standard Gumbel noise, a pure function of (seed, step, token id)."""
    lo = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64, device=device)
    hi = torch.tensor([(s >> 32) & _MASK32 for s in seeds], dtype=torch.int64, device=device)
    step = torch.tensor(list(steps), dtype=torch.int64, device=device)
    h = _hash32(lo ^ _hash32(hi ^ 0x5BD1E995))
    h = _hash32(h ^ _hash32(step + 0x27D4EB2F)).unsqueeze(1)
    tokens = torch.arange(vocab, dtype=torch.int64, device=device).unsqueeze(0)
    bits = _hash32(h ^ _hash32(tokens + 0x165667B1))
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
