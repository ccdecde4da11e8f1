"""The protobuf edge: validate and convert requests in, completions out."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from loraserve.contract import adapter_id_problem
from loraserve.v1 import admin_pb2
from loraserve.v1 import inference_pb2 as pb
from scheduler.errors import InvalidArgument
from scheduler.types import (AdapterRef, Completion, FinishReason, GenerationRequest, ResponseFormat, SamplingParams,
                             Tier)

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_tokens: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_batch_tokens: int
    max_context: int
    """Most tokens one sequence may hold, prompt and generated together: the model's position limit."""
    default_seed: int | None = None
    """The seed of a sampled request that gives none (None: the scheduler draws one at random)."""


def check_fields(req: pb.GenerateRequest, limits: RequestLimits) -> None:
    """Everything checkable before tokenizing; raises InvalidArgument naming the field."""
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"is longer than {MAX_REQUEST_ID_CHARS} characters")
    check_adapter_id(req.adapter_id)
    if not req.prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if req.max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidArgument("max_new_tokens", f"{req.max_new_tokens} exceeds the limit of "
                                                f"{limits.max_new_tokens_limit}")
    if req.HasField("temperature") and not (math.isfinite(req.temperature) and 0 <= req.temperature <= 2):
        raise InvalidArgument("temperature", "must be between 0 and 2")
    if req.HasField("top_p") and not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise InvalidArgument("top_p", "must be in (0, 1]")
    if req.fallback not in FALLBACKS:
        raise InvalidArgument("fallback", f"unknown value {req.fallback}")
    if len(req.stop_sequences) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("stop_sequences", f"at most {MAX_STOP_SEQUENCES} are allowed")
    if any(not s or len(s) > MAX_STOP_CHARS for s in req.stop_sequences):
        raise InvalidArgument("stop_sequences", f"each must have 1 to {MAX_STOP_CHARS} characters")


def check_adapter_id(adapter_id: str) -> None:
    if (problem := adapter_id_problem(adapter_id)) is not None:
        raise InvalidArgument("adapter_id", problem)


FALLBACKS = {pb.FALLBACK_UNSPECIFIED: "", pb.FALLBACK_FAIL: "fail", pb.FALLBACK_BASE: "base"}


def from_pb(req: pb.GenerateRequest, adapter: AdapterRef, prompt_ids: list[int],
            limits: RequestLimits, fallback_to_base: bool = False, client: str = "") -> GenerationRequest:
    """Build the internal request once fields are checked, the adapter resolved and the prompt tokenized."""
    # A prompt must leave the model room for at least one new token.
    prompt_limit = min(limits.max_prompt_tokens, limits.max_context - 1)
    if len(prompt_ids) > prompt_limit:
        raise InvalidArgument("prompt", f"is {len(prompt_ids)} tokens; the limit is {prompt_limit}")
    max_new = req.max_new_tokens or limits.default_max_new_tokens
    total = len(prompt_ids) + max_new
    if total > limits.max_context:
        raise InvalidArgument("max_new_tokens", f"the prompt's {len(prompt_ids)} tokens plus {max_new} new ones "
                                                f"exceed the model's context of {limits.max_context} tokens")
    if total > limits.max_batch_tokens:
        raise InvalidArgument("max_new_tokens", f"prompt plus max_new_tokens exceeds {limits.max_batch_tokens}")
    sampling = SamplingParams(
        temperature=req.temperature if req.HasField("temperature") else 0.0,
        top_p=req.top_p if req.HasField("top_p") else 1.0,
        top_k=req.top_k if req.HasField("top_k") else 0,
        seed=req.seed if req.HasField("seed") else limits.default_seed,
    )
    return GenerationRequest(
        request_id=req.request_id or uuid.uuid4().hex, adapter=adapter, prompt_ids=tuple(prompt_ids),
        max_new_tokens=max_new, sampling=sampling, stop_sequences=tuple(req.stop_sequences),
        ignore_eos=req.ignore_eos, fallback_to_base=fallback_to_base, client=client,
        response_format=_response_format(req))


def _response_format(req: pb.GenerateRequest) -> ResponseFormat | None:
    """json_object: any JSON object; json_schema: JSON valid under it (checked by the engine's compiler)."""
    kind = req.response_format.WhichOneof("format") if req.HasField("response_format") else None
    if kind is None:
        return None
    return ResponseFormat(req.response_format.json_schema if kind == "json_schema" else None)


_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
}
# The one mapping of the tier enum to the proto's: a response's load source and the admin
# service's tiers (whose enum has no REMOTE: the cache never holds an adapter there).
_SOURCE = {Tier.VRAM: pb.LOAD_SOURCE_VRAM, Tier.RAM: pb.LOAD_SOURCE_RAM, Tier.DISK: pb.LOAD_SOURCE_DISK,
           Tier.REMOTE: pb.LOAD_SOURCE_REMOTE}
TIER_PB = {Tier.DISK: admin_pb2.TIER_DISK, Tier.RAM: admin_pb2.TIER_RAM, Tier.VRAM: admin_pb2.TIER_VRAM}
PB_TIER = {v: k for k, v in TIER_PB.items()}


def _summary(c: Completion) -> dict:
    t, cost = c.timings, c.cost
    return dict(
        finish_reason=_FINISH[c.finish_reason],
        usage=pb.Usage(input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                       prefill_device_ms=cost.prefill_device_ms, decode_device_ms=cost.decode_device_ms,
                       adapter_load_ms=cost.adapter_load_ms, cached_input_tokens=c.cached_tokens),
        adapter=pb.AdapterInfo(id=c.adapter.id, version=c.adapter.version, load_source=_SOURCE[c.load_source],
                               fallback_from=c.fallback_from, fallback_reason=c.fallback_reason),
        timings=pb.Timings(queue_ms=t.queue_ms, load_ms=t.load_ms, prefill_ms=t.prefill_ms, decode_ms=t.decode_ms),
    )


def to_pb(c: Completion) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=c.request_id, text=c.text, **_summary(c))


def final_chunk_pb(c: Completion) -> pb.GenerateStreamResponse:
    """The stream's last message: no new text (every delta was already sent), plus the summary."""
    return pb.GenerateStreamResponse(request_id=c.request_id, **_summary(c))


def delta_pb(request_id: str, text: str) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(request_id=request_id, text=text)
