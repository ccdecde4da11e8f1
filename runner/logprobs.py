"""Logprobs for the rows that ask: of each chosen token, and of the prompt tokens a prefill chunk
predicts, with their ranks and the most likely alternatives.

Which distribution: log_softmax of the scores the row's token is chosen from (runner/sampling.py
`Processor`: the model's logits after the penalties and the min_new_tokens mask), temperature,
top_k and top_p not applied: vLLM's default (raw logprobs) but for the penalties, which vLLM's
raw logprobs leave out; here a penalised row's logprobs are of the distribution it chose from.
A prompt position's scores are the model's own (nothing penalises a prompt). So a greedy row's chosen token always has rank 1, and a
request's logprobs do not change with its temperature.

Computed on the device for the asking rows only, and brought to the host inside the step's one
transfer (runner/steps.py `_fetch`): packed as float64 after the tokens and finite flags, which
holds token ids and float32 logprobs exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from loraserve.runner.staging import Staging
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import TokenLogprob


def _table(scores: torch.Tensor, targets: torch.Tensor, top: int) -> torch.Tensor:
    """[M, V] scores, [M] token ids -> [M, 2 + 2 * top] float64: each target's logprob, its rank
    (1 + how many tokens are strictly more likely), the `top` best logprobs, then their ids."""
    lp = torch.log_softmax(scores.float(), dim=-1)
    chosen = lp.gather(1, targets.unsqueeze(1))
    rank = (lp > chosen).sum(dim=-1, keepdim=True) + 1
    parts = [chosen.double(), rank.double()]
    if top:
        best, ids = lp.topk(top, dim=-1)
        parts += [best.double(), ids.double()]
    return torch.cat(parts, dim=1)


def _entries(values: Sequence[float], ids: Sequence[int], tops: Sequence[int], width: int) -> list[TokenLogprob]:
    """`_table`'s rows read back (flattened, `width` = 2 + 2 * its top), each keeping its own top."""
    out = []
    half = (width - 2) // 2
    for k, (token, top) in enumerate(zip(ids, tops)):
        row = values[k * width:(k + 1) * width]
        out.append(TokenLogprob(token, row[0], int(row[1]),
                                tuple((int(row[2 + half + j]), row[2 + j]) for j in range(top))))
    return out


class Logprobs:
    """Packs a step's logprobs after its tokens (`pack`) and reads them back (`unpack`); the
    asking rows' indices and the prompt tokens go in one copy of its own staging buffer."""

    def __init__(self, device: torch.device, rows: int = 16):
        self._staging = Staging(rows * 2, device)

    def pack(self, scores: torch.Tensor, tokens: torch.Tensor, rows: Sequence[Row],
             prompt: tuple[torch.Tensor, Sequence[tuple[int, int]]] | None) -> tuple[torch.Tensor, tuple]:
        """`scores` [B, V] the step's processed scores, `tokens` [B] its choices; `prompt`: the
        scores [M, V] of the prompt positions asked for and, per position, (row index, the prompt
        token it predicts). -> (a flat float64 tensor, what `unpack` needs to read it)."""
        vocab = scores.shape[1]
        asking = [i for i, r in enumerate(rows) if r.logprobs is not None]
        places = prompt[1] if prompt is not None else ()
        dev = self._staging.send([*asking, *(token for _, token in places)])
        parts, layout = [], [None, None]
        if asking:
            top = min(max(rows[i].logprobs for i in asking), vocab)
            idx = dev[:len(asking)]
            parts.append(_table(scores.index_select(0, idx), tokens.index_select(0, idx), top).flatten())
            layout[0] = (asking, 2 + 2 * top)
        if places:
            top = min(max(rows[i].prompt_logprobs for i, _ in places), vocab)
            parts.append(_table(prompt[0], dev[len(asking):], top).flatten())
            layout[1] = (places, 2 + 2 * top)
        return torch.cat(parts), tuple(layout)

    @staticmethod
    def unpack(values: Sequence[float], tokens: Sequence[int], rows: Sequence[Row],
               layout: tuple) -> tuple[list[TokenLogprob | None], list[list[TokenLogprob]]]:
        """-> (each row's chosen token's logprob or None, each row's prompt logprobs in order)."""
        chosen: list[TokenLogprob | None] = [None] * len(rows)
        prompt: list[list[TokenLogprob]] = [[] for _ in rows]
        asking, places = layout
        at = 0
        if asking is not None:
            which, width = asking
            tops = [min(rows[i].logprobs, (width - 2) // 2) for i in which]
            for i, entry in zip(which, _entries(values, [tokens[i] for i in which], tops, width)):
                chosen[i] = entry
            at = len(which) * width
        if places is not None:
            which, width = places
            tops = [min(rows[i].prompt_logprobs, (width - 2) // 2) for i, _ in which]
            for (i, _), entry in zip(which, _entries(values[at:], [t for _, t in which], tops, width)):
                prompt[i].append(entry)
        return chosen, prompt
