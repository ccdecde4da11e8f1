"""One structured line per inference call (logger `loraserve.requests`), whoever ends it: the
service, or the access interceptor when it refuses the call before the service sees it."""

from __future__ import annotations

import json
import logging
import time

from loraserve.scheduler.types import Completion

log = logging.getLogger("loraserve.requests")


def log_request(*, request_id: str, client: str | None, client_key: str, adapter_id: str, base_model: str,
                status: str, started: float, completion: Completion | None = None) -> None:
    line = {"request_id": request_id, "client": client or "anonymous", "client_key": client_key,
            "adapter_id": adapter_id, "base_model": base_model, "status": status,
            "total_ms": round((time.perf_counter() - started) * 1e3, 2)}
    c = completion
    if c is not None:
        t, cost = c.timings, c.cost
        line.update(adapter=c.adapter.id, version=c.adapter.version, load_source=c.load_source.label,
                    queue_ms=round(t.queue_ms, 2), load_ms=round(t.load_ms, 2),
                    generation_ms=round(t.prefill_ms + t.decode_ms, 2), input_tokens=c.input_tokens,
                    output_tokens=c.output_tokens, cached_input_tokens=c.cached_tokens,
                    prefill_device_ms=round(cost.prefill_device_ms, 3),
                    decode_device_ms=round(cost.decode_device_ms, 3), adapter_load_ms=round(cost.adapter_load_ms, 3))
        if c.fallback_reason:
            line.update(fallback_from=c.fallback_from, fallback_reason=c.fallback_reason)
    log.info(json.dumps(line))
