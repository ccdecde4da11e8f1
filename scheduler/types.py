"""Plain request/response types used inside the service (protobuf stays at the edge)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loraserve.contract import BASE_ADAPTER_ID, versioned


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"


class Tier(enum.IntEnum):
    """Where an adapter's weights are, lowest first. The cache keeps each adapter in exactly one
    of DISK, RAM and VRAM (scheduler/cache.py); a completion's `load_source` is the tier its
    adapter was found in when the request needed it, REMOTE when it was first fetched from the
    store's object storage into the disk cache. server/convert.py maps it to the proto's enums."""

    REMOTE = -1
    DISK = 0
    RAM = 1
    VRAM = 2

    @property
    def label(self) -> str:
        """Its name in metrics labels, span attributes, log lines and the clients: vram, ram, ..."""
        return self.name.lower()


@dataclass(frozen=True)
class AdapterRef:
    """A resolved adapter: canonical id, version, its directory (None for the bare base) and the
    sha256 its weights file must have (checked when read; empty skips the check)."""

    id: str
    version: str
    path: str | None = None
    sha256: str = ""

    @property
    def is_base(self) -> bool:
        return self.path is None

    @property
    def key(self) -> str:
        return versioned(self.id, self.version)


BASE = AdapterRef(BASE_ADAPTER_ID, "-")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no filtering; the penalties at
    their defaults (1, 0, 0) change no score."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class ResponseFormat:
    """Output constrained to JSON: any JSON object when json_schema is None, else JSON valid
    under that schema (JSON text)."""

    json_schema: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's natural-log probability at its place (None: the prompt's first token), its
    rank there (1: the most likely) and the `top` most likely (token id, logprob) there."""

    token_id: int
    logprob: float | None
    rank: int = 0
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    adapter: AdapterRef
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    fallback_to_base: bool = False
    """The edge's verdict on its fallback mode and its adapter's passport (scheduler/fallback.py):
    if the adapter cannot be loaded, serve the bare base model instead (flagged) of failing."""
    fallback_reason: str = ""
    """Set when this request was moved to the base model: why (an ErrorInfo reason)."""
    requested: str = ""
    """The adapter the caller named, as id@version, when a fallback replaced it."""
    client: str = ""
    """Who sent it (authenticated client, else the peer's address): the unit of fair share."""
    min_new_tokens: int = 0
    """Neither EOS nor a stop sequence ends the output before this many tokens."""
    logprobs: int | None = None
    """Per generated token: its logprob and this many alternatives (None: no logprobs)."""
    prompt_logprobs: int | None = None
    """Per prompt token: its logprob and this many alternatives (None: none)."""
    score_only: bool = False
    """Generate nothing: the prefill's prompt logprobs are the answer."""
    response_format: ResponseFormat | None = None
    shadow: bool = False
    """A mirrored request (a shadow version's): it never delays a real one and is shed first."""

    @property
    def token_budget(self) -> int:
        """Tokens this request may occupy in a batch's KV cache (score_only: its prompt's)."""
        return len(self.prompt_ids) + (0 if self.score_only else self.max_new_tokens)


@dataclass(frozen=True)
class Timings:
    """A response's phase durations (milliseconds), read off its Timeline."""

    queue_ms: float = 0.0
    load_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass
class Cost:
    """What serving a request took, as its share (milliseconds): of every engine step it was a row
    of (scheduler/step.py: `charge` says how a step is shared), and of the adapter load made usable
    for the requests it was admitted with. Shares add up: summed over requests, they are the steps'
    and loads' whole time, so a team can be billed or capacity planned from them."""

    prefill_device_ms: float = 0.0
    decode_device_ms: float = 0.0
    adapter_load_ms: float = 0.0


@dataclass
class Timeline:
    """When each phase of a request began and ended, on the scheduler's clock (seconds), and
    what the phases that come and go (loads, steps) took (milliseconds): its Timings.

    load_started precedes dispatched when the adapter was read from disk while the
    request waited; load_shared says that read was started for an earlier request.
    """

    enqueued: float = 0.0
    dispatched: float = 0.0
    load_started: float = 0.0
    load_ended: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    load_shared: bool = False
    load_bytes: int = 0
    fetch_bytes: int = 0
    """Bytes downloaded from the remote origin for this load (0: it was on local disk)."""
    fetch_ms: float = 0.0
    load_ms: float = 0.0
    """Reading (ahead of dispatch, if it was cold) and attaching its adapter, as the tiers timed
    them: not load_ended - load_started, which counts a read's wait for dispatch too."""
    prefill_ms: float = 0.0
    """The steps it prefilled in, added up (a re-prefill after a preemption too)."""
    decode_ms: float = 0.0
    """The steps it decoded in, added up."""

    @property
    def timings(self) -> Timings:
        return Timings(queue_ms=max(self.dispatched - self.enqueued, 0.0) * 1e3, load_ms=self.load_ms,
                       prefill_ms=self.prefill_ms, decode_ms=self.decode_ms)


@dataclass(frozen=True)
class TextDelta:
    """Text that became final since the previous delta, the tokens generated since then and,
    when asked for, their logprobs."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    adapter: AdapterRef
    load_source: Tier
    fallback_reason: str = ""
    fallback_from: str = ""
    timeline: Timeline = field(default_factory=Timeline)
    cost: Cost = field(default_factory=Cost)
    cached_tokens: int = 0
    """Prompt tokens whose keys came from shared prefix blocks instead of being computed."""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One per generated token when the request asked for logprobs."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """One per prompt token when the request asked for prompt_logprobs."""

    @property
    def timings(self) -> Timings:
        return self.timeline.timings
