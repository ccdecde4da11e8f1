"""The one fallback rule: when a request whose adapter cannot serve it is answered by the bare base
model instead of failing.

It falls back only when all of these hold:
- the request did not ask to fail: its mode is "base" or "" (unspecified), and either defers to
  the adapter, so a caller can never ask for what the adapter's owner forbids;
- its adapter's passport says `fallback: base` (an adapter without a passport never does);
- it has produced no tokens yet: a stream never changes model half-way.

The adapter may fail it at the edge (server/service.py: its version is refused) or in the
scheduler (its load failed, now or within the failed-load backoff). The edge knows the passport
and the scheduler the tokens, so the edge applies the rule first, with none produced, and the
request carries that verdict (GenerationRequest.fallback_to_base) for the scheduler to apply it
again with what the request has produced (`carried`). A request that falls back says so: the
reason and the adapter it asked for (`to_base`).
"""

from __future__ import annotations

from dataclasses import replace

from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.types import BASE, GenerationRequest

def falls_back(mode: str, adapter: str | None, produced: int = 0) -> bool:
    """The rule above: `mode` the request's, `adapter` its passport's `fallback` (None: no
    passport), `produced` the tokens it has generated."""
    return mode != "fail" and adapter == "base" and produced == 0


def carried(req: GenerationRequest, produced: int = 0) -> bool:
    """The rule for a request already past the edge: its fallback_to_base is the edge's verdict
    on its mode and passport, and what it has produced decides the rest."""
    return falls_back("base" if req.fallback_to_base else "fail", "base", produced)


def to_base(req: GenerationRequest, exc: LoraServeError) -> GenerationRequest:
    """`req` served by the base model, flagged with why and what it asked for; it falls back once."""
    return replace(req, adapter=BASE, fallback_to_base=False, fallback_reason=exc.reason,
                   requested=req.adapter.key)
