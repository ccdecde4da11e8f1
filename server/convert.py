"""The protobuf edge: validate and convert requests in, completions out."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from loraserve.contract import adapter_id_problem
from loraserve.v1 import admin_pb2
from loraserve.v1 import inference_pb2 as pb
from loraserve.scheduler.errors import InvalidArgument
from loraserve.scheduler.types import (AdapterRef, Completion, Cost, FinishReason, GenerationRequest, ResponseFormat,
                             SamplingParams, TextDelta, Tier, TokenLogprob)

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_MESSAGES = 256
MAX_LOGPROBS = 20
MAX_CHOICES = 16
ROLES = ("system", "user", "assistant")
PROMPT_FORMS = ("prompt", "messages", "prompt_token_ids")
"""A request's prompt is exactly one of these fields."""
TokenTexts = Callable[[Sequence[int]], list[str]]
"""Token ids -> each token's own text (runner.tokens.Tokens.texts)."""


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
    given = [f for f in PROMPT_FORMS if getattr(req, f)]
    if not given:
        raise InvalidArgument("prompt", "must not be empty (or send messages or prompt_token_ids instead)")
    if len(given) > 1:
        raise InvalidArgument(given[1], f"send exactly one of prompt, messages and prompt_token_ids, "
                                        f"not {' and '.join(given)}")
    check_messages(req.messages)
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
    if req.HasField("repetition_penalty") and not (math.isfinite(req.repetition_penalty)
                                                    and 0 < req.repetition_penalty <= 2):
        raise InvalidArgument("repetition_penalty", "must be in (0, 2]")
    for name in ("presence_penalty", "frequency_penalty"):
        if req.HasField(name) and not (math.isfinite(value := getattr(req, name)) and -2 <= value <= 2):
            raise InvalidArgument(name, "must be between -2 and 2")
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(req, name) > MAX_LOGPROBS:
            raise InvalidArgument(name, f"at most {MAX_LOGPROBS} alternatives per token are returned")
    if req.n > MAX_CHOICES:
        raise InvalidArgument("n", f"must be 0 to {MAX_CHOICES}")
    if req.score_only:
        if not req.HasField("prompt_logprobs"):
            raise InvalidArgument("score_only", "needs prompt_logprobs: the prompt's scores are its answer")
        if req.n > 1:
            raise InvalidArgument("n", "score_only generates nothing, so there is one choice")
        if req.HasField("response_format"):
            raise InvalidArgument("response_format", "score_only generates nothing to constrain")
    response_format(req)


def check_messages(messages: Sequence[pb.Message]) -> None:
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument("messages", f"at most {MAX_MESSAGES} are allowed")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, not {m.role[:32]!r}")
        if not m.content:
            raise InvalidArgument(f"messages[{i}].content", "must not be empty")


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise InvalidArgument("prompt_token_ids", f"{bad} is not a token id: the vocabulary has {vocab_size}")


def response_format(req: pb.GenerateRequest) -> ResponseFormat | None:
    """The request's output constraint, None when it sets none. Only that the schema is a JSON object
    is checked here; whether the grammar library can compile it is checked where it is compiled."""
    if not req.HasField("response_format"):
        return None
    kind = req.response_format.WhichOneof("format")
    if kind is None:
        raise InvalidArgument("response_format", "set json_object or json_schema")
    if kind == "json_object":
        return ResponseFormat()
    try:
        schema = json.loads(req.response_format.json_schema)
    except ValueError as exc:
        raise InvalidArgument("response_format.json_schema", f"is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument("response_format.json_schema", "must be a JSON object (a JSON Schema)")
    return ResponseFormat(req.response_format.json_schema)


def check_adapter_id(adapter_id: str) -> None:
    if (problem := adapter_id_problem(adapter_id)) is not None:
        raise InvalidArgument("adapter_id", problem)


FALLBACKS = {pb.FALLBACK_UNSPECIFIED: "", pb.FALLBACK_FAIL: "fail", pb.FALLBACK_BASE: "base"}


def from_pb(req: pb.GenerateRequest, adapter: AdapterRef, prompt_ids: list[int],
            limits: RequestLimits, fallback_to_base: bool = False, client: str = "") -> GenerationRequest:
    """Build the internal request once fields are checked, the adapter resolved and the prompt tokenized."""
    if req.truncate_input_tokens:
        prompt_ids = prompt_ids[-req.truncate_input_tokens:]
    # A prompt must leave the model room for at least one new token.
    prompt_limit = min(limits.max_prompt_tokens, limits.max_context - 1)
    if len(prompt_ids) > prompt_limit:
        raise InvalidArgument(prompt_field(req), f"is {len(prompt_ids)} tokens; the limit is {prompt_limit}")
    # Scoring runs the prefill alone: its one sampled token is all the room it takes.
    max_new = 1 if req.score_only else req.max_new_tokens or limits.default_max_new_tokens
    if req.min_new_tokens > max_new:
        raise InvalidArgument("min_new_tokens", f"{req.min_new_tokens} exceeds max_new_tokens ({max_new})")
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
        repetition_penalty=req.repetition_penalty if req.HasField("repetition_penalty") else 1.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )
    return GenerationRequest(
        request_id=req.request_id or uuid.uuid4().hex, adapter=adapter, prompt_ids=tuple(prompt_ids),
        max_new_tokens=max_new, sampling=sampling, stop_sequences=tuple(req.stop_sequences),
        ignore_eos=req.ignore_eos, fallback_to_base=fallback_to_base, client=client,
        min_new_tokens=req.min_new_tokens,
        logprobs=req.logprobs if req.HasField("logprobs") else None,
        prompt_logprobs=req.prompt_logprobs if req.HasField("prompt_logprobs") else None,
        score_only=req.score_only, response_format=response_format(req))


def prompt_field(req: pb.GenerateRequest) -> str:
    """The field the request's prompt is in."""
    return next((f for f in PROMPT_FORMS if getattr(req, f)), "prompt")


def fan_out(req: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The `n` choices (0 means 1) of one request: the same id and prompt, and sampled ones given a
    seed get seed, seed + 1, ... (without one the scheduler draws each its own). The prompt's
    logprobs are the same for every choice: the first alone computes them."""
    s, others = req.sampling, replace(req, prompt_logprobs=None)
    seeded = not s.greedy and s.seed is not None
    return [req] + [replace(others, sampling=replace(s, seed=(s.seed + i) % 2**64)) if seeded else others
                    for i in range(1, max(n, 1))]


def combined(choices: Sequence[Completion]) -> Completion:
    """One request's whole account from its choices (index order): the first's answer and
    prompt, every choice's output tokens and costs."""
    first = choices[0]
    if len(choices) == 1:
        return first
    costs = [c.cost for c in choices]
    return replace(first, output_tokens=sum(c.output_tokens for c in choices), cost=Cost(
        sum(c.prefill_device_ms for c in costs), sum(c.decode_device_ms for c in costs),
        sum(c.adapter_load_ms for c in costs)))


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


def logprobs_pb(items: Sequence[TokenLogprob] | None, texts: TokenTexts) -> list[pb.TokenLogprob]:
    if not items:
        return []
    ids = list(dict.fromkeys([t.token_id for t in items] + [i for t in items for i, _ in t.top]))
    names = dict(zip(ids, texts(ids)))
    out = []
    for t in items:
        msg = pb.TokenLogprob(token_id=t.token_id, token=names[t.token_id], rank=t.rank,
                              top=[pb.TopLogprob(token_id=i, token=names[i], logprob=lp) for i, lp in t.top])
        if t.logprob is not None:
            msg.logprob = t.logprob
        out.append(msg)
    return out


def to_pb(choices: Sequence[Completion], texts: TokenTexts) -> pb.GenerateResponse:
    """Generate's answer from its choices in index order; `choices` lists them all when there are several."""
    first, whole = choices[0], combined(choices)
    listed = [pb.Choice(index=i, text=c.text, finish_reason=_FINISH[c.finish_reason], token_ids=c.token_ids,
                        logprobs=logprobs_pb(c.logprobs, texts)) for i, c in enumerate(choices)]
    return pb.GenerateResponse(
        request_id=first.request_id, text=first.text, token_ids=first.token_ids,
        logprobs=listed[0].logprobs, prompt_logprobs=logprobs_pb(first.prompt_logprobs, texts),
        choices=listed if len(choices) > 1 else (), **_summary(whole))


def final_chunk_pb(c: Completion, index: int, texts: TokenTexts) -> pb.GenerateStreamResponse:
    """A choice's last message: no new text or tokens (every delta was already sent), plus its
    summary and, when asked for, the prompt's logprobs (known once the choice is done)."""
    return pb.GenerateStreamResponse(request_id=c.request_id, index=index,
                                     prompt_logprobs=logprobs_pb(c.prompt_logprobs, texts), **_summary(c))


def delta_pb(request_id: str, delta: TextDelta, index: int, texts: TokenTexts) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(request_id=request_id, text=delta.text, index=index, token_ids=delta.token_ids,
                                     logprobs=logprobs_pb(delta.logprobs, texts))


def tokenize_pb(text: str, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_ids=ids, text=text, offsets=[pb.Offset(start=a, end=b) for a, b in spans])
