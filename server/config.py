"""The one validated server configuration: a tree of sections, each field documented once.

Its users see flat names (`--max-batch-size`, LORASERVE_MAX_BATCH_SIZE: server/settings.py), a
config file the sections (`[scheduler] max_batch_size = 32`); every field name is unique across
sections so that one maps onto the other. `loraserve serve --help` and docs/operations.md's
configuration reference are generated from the descriptions here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from loraserve.contract import ROUTING_HEADER, adapter_id_problem
from loraserve.registry.location import DEFAULT_MODEL, DEFAULT_STORE, S3Location, is_remote
from loraserve.scheduler.housekeeping import WarmAt
from loraserve.scheduler.policy import POLICIES, BatchLimits
from loraserve.server.auth import Authenticator

QUANTIZATIONS = ("none", "nf4", "int8")
KERNELS = ("auto", "flex", "reference")  # runner.kvpool.KERNELS, without importing torch here
DTYPES = ("auto", "float32", "bfloat16", "float16")
WARM_AT = re.compile(r"(?P<hour>[01][0-9]|2[0-3]):(?P<minute>[0-5][0-9])=(?P<adapter>.+)")
METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
"""A gRPC metadata key that carries text (keys ending in -bin carry bytes)."""
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_KEYS = frozenset({"authorization", ROUTING_HEADER, "user-agent", "content-type", "te", "traceparent"})


def _names(value):
    """A flag or variable gives a list as one comma-separated string; a file as a list."""
    return tuple(item.strip() for item in value.split(",") if item.strip()) if isinstance(value, str) else value


Names = Annotated[tuple[str, ...], BeforeValidator(_names)]
StoreLocation = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]
OptionalPath = Annotated[Path | None, BeforeValidator(lambda value: value or None)]


def _f(default, description: str):
    return Field(default, description=description)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def problems(self) -> list[str]:
        """What is wrong within this section alone (the root adds what spans sections)."""
        return []


class FrontsSection(Section):
    """Listeners: gRPC, its plaintext health port, the OpenAI-compatible HTTP front; and shutdown."""

    host: str = _f("127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
    port: int = _f(50051, "TCP port of the gRPC service; 0 picks a free one.")
    health_port: int = _f(-1, "Port of a second, plaintext listener that serves only grpc.health.v1 (for probes "
                              "that cannot speak TLS, such as Kubernetes' native gRPC probes); 0 picks a free "
                              "one, -1 turns it off.")
    http_host: str = _f("", "Interface of the OpenAI-compatible HTTP front (/v1); empty = the same as host.")
    http_port: int = _f(8000, "Port of the OpenAI-compatible HTTP front (/v1/completions, /v1/chat/completions, "
                              "/v1/models; docs/api.md): the same scheduler, tokens and metrics as gRPC; 0 turns "
                              "it off.")
    grace_period_s: float = _f(30.0, "On SIGTERM, how long in-flight requests may take to finish.")

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if not -1 <= self.health_port <= 65535:
            problems.append(f"health_port {self.health_port} is not in -1..65535")
        elif self.health_port > 0 and self.health_port == self.port:
            problems.append("health_port must differ from port")
        if not 0 <= self.http_port <= 65535:
            problems.append(f"http_port {self.http_port} is not in 0..65535")
        if self.grace_period_s < 0:
            problems.append("grace_period_s must not be negative")
        return problems


class ModelSection(Section):
    """The base model and how its weights are held."""

    model_path: Path = _f(DEFAULT_MODEL, "Hugging Face model directory of the base model.")
    quantization: str = _f("none", "Base model weights: none, nf4 or int8 (bitsandbytes; both work on a CPU).")
    device: str = _f("auto", "auto (cuda if present, else cpu), cpu, cuda or cuda:N.")
    dtype: str = _f("auto", "Compute dtype: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16.")

    def problems(self) -> list[str]:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device {self.device!r} is not auto, cpu, cuda or cuda:N")
        return problems


class EngineSection(Section):
    """The engine's steps and its paged KV cache."""

    kv_cache_mib: float = _f(0.0, "KV pool budget, MiB; 0 = on cuda gpu_memory_fraction of the device less weights, "
                                  "adapter slots and a workspace estimate, elsewhere 512 MiB; a default budget is "
                                  "capped at what max_batch_size sequences of max_model_len tokens can use.")
    kv_block_size: int = _f(16, "Token positions per KV cache block (the unit sequences take as they grow).")
    gpu_memory_fraction: float = _f(0.90, "cuda: the share of device memory the process may fill (weights, "
                                          "adapters, KV pool) when kv_cache_mib is 0.")
    attention: str = _f("auto", "Decode attention: auto (flex on cuda with --kv-block-size a power of two of at "
                                "least 16, reference otherwise), flex (FlexAttention over the block tables) or "
                                "reference (a gather of each row's positions, and SDPA).")
    max_model_len: int = _f(0, "Most tokens (prompt + generated) per sequence; 0 = the model's position limit "
                               "(max_position_embeddings).")
    prefill_chunk_tokens: int = _f(512, "Prompt tokens one prefill forward takes at most; longer prompts run in "
                                        "chunks (bounded activation memory); 0 = no limit.")
    no_cuda_graphs: bool = _f(False, "Run decode steps eagerly on cuda too, instead of replaying captured CUDA "
                                     "graphs (for debugging; slower).")
    deterministic: bool = _f(False, "Batch-invariant serving: a request's output never depends on what else is in "
                                    "its batch (each row's forward runs alone, torch's deterministic algorithms, "
                                    "seed 0 for sampled requests that give none; docs/architecture.md, What "
                                    "batching guarantees). Costs throughput.")

    def problems(self) -> list[str]:
        problems = []
        if min(self.kv_cache_mib, self.max_model_len, self.prefill_chunk_tokens) < 0:
            problems.append("kv_cache_mib, max_model_len and prefill_chunk_tokens must not be negative")
        if self.kv_block_size < 1:
            problems.append("kv_block_size must be at least 1")
        if not 0 < self.gpu_memory_fraction <= 1:
            problems.append("gpu_memory_fraction must be in (0, 1]")
        if self.attention not in KERNELS:
            problems.append(f"attention must be one of {', '.join(KERNELS)}, not {self.attention!r}")
        return problems


class LoraSection(Section):
    """Adapters: slots, tier budgets, loading, and which are kept warm."""

    max_lora_rank: int = _f(64, "Largest adapter rank accepted (every adapter slot has room for it).")
    max_loras: int = _f(64, "Adapters attached at once: slots reserved at start-up, capped by vram_budget_mib.")
    lora_target_modules: Names = _f((), "Leaf names of the linear layers LoRA is applied to (comma-separated, "
                                        "e.g. q_proj,v_proj): only they get slot stacks, and an adapter adapting "
                                        "any other is refused (ADAPTER_INCOMPATIBLE). Empty: the union of what the "
                                        "store's servable versions adapt at start-up (every linear layer but "
                                        "lm_head when it has none).")
    ram_budget_mib: float = _f(2048.0, "Host-RAM tier budget for adapter weights, MiB.")
    vram_budget_mib: float = _f(1024.0, "Device (VRAM) tier budget for attached adapter weights, MiB.")
    max_concurrent_loads: int = _f(2, "Most adapters read from disk at the same time (single-flight per adapter).")
    failed_load_backoff_s: float = _f(30.0, "After an adapter fails to load, its requests fail fast this long.")
    idle_ttl_s: float = _f(0.0, "Unload adapters unused this long (seconds); 0 keeps them.")
    warm: Names = _f((), "Adapter ids attached at start-up (comma-separated).")
    pin: Names = _f((), "Adapter ids attached at start-up and never evicted (comma-separated).")
    warm_schedule: Names = _f((), "Daily warm-ups, HH:MM=ADAPTER, comma-separated (local time).")

    def problems(self) -> list[str]:
        problems = [f"{name} must be at least 1" for name in ("max_concurrent_loads", "max_lora_rank", "max_loras")
                    if getattr(self, name) < 1]
        if self.failed_load_backoff_s < 0:
            problems.append("failed_load_backoff_s must not be negative")
        if min(self.ram_budget_mib, self.vram_budget_mib, self.idle_ttl_s) < 0:
            problems.append("ram_budget_mib, vram_budget_mib and idle_ttl_s must not be negative")
        bad = [w for w in self.warm_schedule if not (m := WARM_AT.fullmatch(w)) or adapter_id_problem(m["adapter"])]
        if bad:
            problems.append(f"warm_schedule entries must look like 08:55=support, not {bad[0]!r}")
        bad = [a for a in (*self.warm, *self.pin) if adapter_id_problem(a)]
        if bad:
            problems.append(f"warm and pin take adapter ids (name, alias or name@VERSION), not {bad[0]!r}")
        bad = [m for m in self.lora_target_modules if not MODULE_NAME.fullmatch(m) or m == "lm_head"]
        if bad:
            problems.append(f"lora_target_modules takes leaf names of linear layers other than lm_head "
                            f"(q_proj, v_proj, ...), not {bad[0]!r}")
        return problems

    @property
    def ram_budget_bytes(self) -> int:
        return int(self.ram_budget_mib * 2**20)

    @property
    def vram_budget_bytes(self) -> int:
        return int(self.vram_budget_mib * 2**20)

    @property
    def warm_times(self) -> list[WarmAt]:
        return [WarmAt(int(m["hour"]), int(m["minute"]), m["adapter"])
                for m in map(WARM_AT.fullmatch, self.warm_schedule)]


class SchedulerSection(Section):
    """Batching and the queue."""

    max_batch_size: int = _f(16, "Most sequences decoded together in one batch.")
    max_batch_tokens: int = _f(8192, "Most prompt+max_new_tokens summed over one batch.")
    max_num_batched_tokens: int = _f(1024, "Most tokens one step computes: each decoding row counts one, prefills "
                                           "take chunks of the rest (a long prompt runs over several steps, "
                                           "between decode steps, so running streams keep their pace).")
    batch_policy: str = _f("mixed", "mixed: any adapters share a batch; grouped: one adapter per batch.")
    join_delay_ms: float = _f(20.0, "How long newcomers may wait to join a running batch together.")
    batch_wait_ms: float = _f(2.0, "How long the scheduler lets arrivals gather before forming a batch.")
    max_queue: int = _f(1024, "Most queued requests; beyond it RESOURCE_EXHAUSTED.")
    no_prefix_caching: bool = _f(False, "Do not share the KV blocks of identical prompt prefixes between requests for "
                                        "the same adapter version (off anyway with deterministic).")

    def problems(self) -> list[str]:
        problems = [f"{name} must be at least 1" for name in ("max_batch_size", "max_batch_tokens",
                                                              "max_num_batched_tokens", "max_queue")
                    if getattr(self, name) < 1]
        if self.batch_policy not in POLICIES:
            problems.append(f"batch_policy must be one of {', '.join(POLICIES)}, not {self.batch_policy!r}")
        if min(self.batch_wait_ms, self.join_delay_ms) < 0:
            problems.append("batch_wait_ms and join_delay_ms must not be negative")
        return problems

    def batch_limits(self) -> BatchLimits:
        return BatchLimits(max_batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens,
                           policy=self.batch_policy, join_delay_s=self.join_delay_ms / 1e3,
                           max_num_batched_tokens=self.max_num_batched_tokens)


class LimitsSection(Section):
    """What one request, one client and gRPC itself may take."""

    max_prompt_tokens: int = _f(1024, "Longest accepted prompt, in tokens.")
    max_new_tokens_limit: int = _f(512, "Largest accepted max_new_tokens.")
    default_max_new_tokens: int = _f(64, "max_new_tokens when a request leaves it 0.")
    max_message_bytes: int = _f(1 << 20, "Largest gRPC message accepted or sent, bytes.")
    max_streams_per_client: int = _f(256, "Most inference calls one client may have open at once (beyond: "
                                          "RESOURCE_EXHAUSTED); 0 means no limit.")
    max_pending_calls: int = _f(16384, "Calls gRPC may hold before a handler picks them up (its own queue, "
                                       "grpc.server.max_pending_requests and its hard limit, both set to this; "
                                       "gRPC's defaults, 1,000 and 3,000, drop calls of a burst as bare CANCELLED): "
                                       "past it gRPC cancels calls itself, with no ErrorInfo. Far above what "
                                       "max_queue and max_streams_per_client admit, so overload is refused by "
                                       "them (QUEUE_FULL, CLIENT_STREAM_LIMIT) instead.")

    def problems(self) -> list[str]:
        problems = [f"{name} must be at least 1" for name in ("max_pending_calls", "max_prompt_tokens",
                                                              "max_new_tokens_limit", "default_max_new_tokens")
                    if getattr(self, name) < 1]
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            problems.append("default_max_new_tokens exceeds max_new_tokens_limit")
        if self.max_message_bytes < 1024:
            problems.append("max_message_bytes must be at least 1024")
        if self.max_streams_per_client < 0:
            problems.append("max_streams_per_client must not be negative")
        return problems


class RegistrySection(Section):
    """The adapter registry store, and with an s3:// one the disk cache in front of it."""

    adapters_dir: StoreLocation = _f(DEFAULT_STORE, "The adapter registry store (docs/adapters.md): a "
                                                          "directory, or s3://BUCKET/PREFIX (credentials from the "
                                                          "standard AWS variables and files).")
    s3_endpoint_url: str = _f("", "S3-compatible endpoint (MinIO, Ceph, R2, moto) for an s3:// store; empty = AWS's "
                                  "(or AWS_ENDPOINT_URL).")
    disk_cache_dir: Path = _f(Path("var/adapter-cache"), "With an s3:// store: where fetched adapters are kept (one "
                                                         "server per directory).")
    disk_cache_mib: float = _f(10240.0, "With an s3:// store: byte budget of the disk cache, MiB (LRU eviction).")
    origin_timeout_s: float = _f(30.0, "With an s3:// store: limit for one try of a fetch or index read, seconds "
                                       "(a stalled GET fails then).")
    origin_retries: int = _f(3, "With an s3:// store: retries of a failed fetch (timeouts, refused connections, "
                                "5xx, throttling; not 403/404), with exponential backoff and jitter.")
    index_poll_s: float = _f(5.0, "How often the registry index is checked for changes: an s3:// store's ETag (the "
                                  "only check there), a local store's file (also checked on every look-up); health "
                                  "loraserve.registry is updated then.")

    def problems(self) -> list[str]:
        problems = []
        if min(self.disk_cache_mib, self.origin_timeout_s, self.index_poll_s) <= 0 or self.origin_retries < 0:
            problems.append("disk_cache_mib, origin_timeout_s and index_poll_s must be positive, origin_retries "
                            "not negative")
        if self.remote:
            try:
                S3Location.parse(self.adapters_dir)
            except ValueError as exc:
                problems.append(f"adapters_dir: {exc}")
        elif self.s3_endpoint_url:
            problems.append("s3_endpoint_url applies only to an s3:// adapters_dir")
        return problems

    @property
    def remote(self) -> bool:
        """Whether adapters come from object storage (through the disk cache)."""
        return is_remote(self.adapters_dir)


class TelemetrySection(Section):
    """Prometheus metrics and logging."""

    metrics_host: str = _f("127.0.0.1", "Interface for the Prometheus /metrics endpoint.")
    metrics_port: int = _f(9464, "Port for /metrics; 0 picks a free one, -1 turns it off.")
    metrics_adapter_labels: int = _f(50, "Adapters with their own metrics label value (the first to be asked "
                                         "for keep it); the rest are counted as _other.")
    metrics_client_labels: int = _f(50, "Clients with their own label value on the cost counters; the rest are "
                                        "counted as _other.")
    thrash_limit: int = _f(10, "Warn when one adapter is read from disk more than this many times in an hour.")
    log_level: str = _f("INFO", "Python logging level.")

    def problems(self) -> list[str]:
        problems = []
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port {self.metrics_port} is not in -1..65535")
        if self.thrash_limit < 1:
            problems.append("thrash_limit must be at least 1")
        if min(self.metrics_adapter_labels, self.metrics_client_labels) < 0:
            problems.append("metrics_adapter_labels and metrics_client_labels must not be negative")
        return problems


class SecuritySection(Section):
    """TLS, mTLS and who a client is."""

    auth_tokens_file: OptionalPath = _f(None, "JSON file of bearer tokens -> clients; unset turns authentication "
                                              "off.")
    tls_cert: OptionalPath = _f(None, "PEM certificate chain; with tls_key enables TLS.")
    tls_key: OptionalPath = _f(None, "PEM private key for tls_cert.")
    tls_client_ca: OptionalPath = _f(None, "PEM CA bundle; when set, clients must present a certificate it signed "
                                           "(mTLS). Needs tls_cert.")
    client_id_metadata_key: str = _f("", "Without auth_tokens_file: a metadata key whose value identifies the "
                                         "client (stream limit, fair share) instead of its address. Trusted as "
                                         "sent: set it only behind a proxy that overwrites that key.")

    def problems(self) -> list[str]:
        problems = []
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
        key = self.client_id_metadata_key
        if key and (not METADATA_KEY.fullmatch(key) or key.endswith("-bin") or key.startswith("grpc-")
                    or key in RESERVED_KEYS):
            problems.append(f"client_id_metadata_key {key!r} must be a lower-case text metadata key "
                            "([0-9a-z_.-], not -bin, grpc-* or one the service reads itself)")
        if key and self.auth_tokens_file is not None:
            problems.append("client_id_metadata_key applies only without auth_tokens_file (a token names "
                            "its client)")
        return problems


class ServerConfig(BaseModel):
    """Every section, validated together: one ValueError lists every problem."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fronts: FrontsSection = FrontsSection()
    model: ModelSection = ModelSection()
    engine: EngineSection = EngineSection()
    lora: LoraSection = LoraSection()
    scheduler: SchedulerSection = SchedulerSection()
    limits: LimitsSection = LimitsSection()
    registry: RegistrySection = RegistrySection()
    telemetry: TelemetrySection = TelemetrySection()
    security: SecuritySection = SecuritySection()

    @model_validator(mode="after")
    def _valid(self) -> ServerConfig:
        problems = [p for name in type(self).model_fields for p in getattr(self, name).problems()]
        fronts = self.fronts
        if fronts.http_port and fronts.http_port in (fronts.port, fronts.health_port, self.telemetry.metrics_port):
            problems.append("http_port must differ from port, health_port and metrics_port")
        if self.limits.max_prompt_tokens + 1 > self.scheduler.max_batch_tokens:
            problems.append("max_batch_tokens must leave room for a full prompt and one new token")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def check_paths(self) -> None:
        """Fail fast on missing or unusable files (separate so tests can build configs before models)."""
        security = self.security
        store = None if self.registry.remote else self.registry.adapters_dir
        missing = [p for p in (self.model.model_path / "config.json", store, security.tls_cert, security.tls_key,
                               security.tls_client_ca, security.auth_tokens_file)
                   if p is not None and not Path(p).exists()]
        if missing:
            raise ValueError(f"not found: {', '.join(map(str, missing))} (the demo: `loraserve demo build`)")
        Authenticator.from_file(security.auth_tokens_file)
