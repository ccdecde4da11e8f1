import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
    TIER_RAM: _ClassVar[Tier]
    TIER_VRAM: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_DISK: Tier
TIER_RAM: Tier
TIER_VRAM: Tier

class AdapterStatus(_message.Message):
    __slots__ = ("id", "version", "tier", "size_bytes", "last_used", "pinned", "in_use", "status", "canary")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    tier: Tier
    size_bytes: int
    last_used: _timestamp_pb2.Timestamp
    pinned: bool
    in_use: bool
    status: str
    canary: CanaryState
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., size_bytes: _Optional[int] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pinned: _Optional[bool] = ..., in_use: _Optional[bool] = ..., status: _Optional[str] = ..., canary: _Optional[_Union[CanaryState, _Mapping]] = ...) -> None: ...

class CanaryState(_message.Message):
    __slots__ = ("state", "percent", "key", "started_at", "ended_at", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: str
    percent: float
    key: str
    started_at: str
    ended_at: str
    reason: str
    def __init__(self, state: _Optional[str] = ..., percent: _Optional[float] = ..., key: _Optional[str] = ..., started_at: _Optional[str] = ..., ended_at: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterStatus]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterStatus, _Mapping]]] = ...) -> None: ...

class WarmAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "tier")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tier: Tier
    def __init__(self, adapter_id: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class WarmAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterStatus
    def __init__(self, adapter: _Optional[_Union[AdapterStatus, _Mapping]] = ...) -> None: ...

class EvictAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "tier")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tier: Tier
    def __init__(self, adapter_id: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class EvictAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterStatus
    def __init__(self, adapter: _Optional[_Union[AdapterStatus, _Mapping]] = ...) -> None: ...

class PinAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class PinAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterStatus
    def __init__(self, adapter: _Optional[_Union[AdapterStatus, _Mapping]] = ...) -> None: ...

class UnpinAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class UnpinAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterStatus
    def __init__(self, adapter: _Optional[_Union[AdapterStatus, _Mapping]] = ...) -> None: ...

class GetCacheStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "hits", "misses", "loads", "evictions", "bytes_used", "bytes_budget", "adapters")
    TIER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_BUDGET_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    hits: int
    misses: int
    loads: int
    evictions: int
    bytes_used: int
    bytes_budget: int
    adapters: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ..., bytes_used: _Optional[int] = ..., bytes_budget: _Optional[int] = ..., adapters: _Optional[int] = ...) -> None: ...

class GetCacheStatsResponse(_message.Message):
    __slots__ = ("tiers", "loads_in_flight", "peak_loads_in_flight", "max_context_tokens", "kv_slots", "kv_slots_in_use", "kv_pool_bytes", "kv_block_size", "kv_blocks_total", "kv_blocks_used", "kv_blocks_cached", "kv_tokens_held", "kv_pool_tokens", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "preemptions", "registry_reload_errors", "registry_index_error")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LOADS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PEAK_LOADS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_HELD_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_RELOAD_ERRORS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_INDEX_ERROR_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    loads_in_flight: int
    peak_loads_in_flight: int
    max_context_tokens: int
    kv_slots: int
    kv_slots_in_use: int
    kv_pool_bytes: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_tokens_held: int
    kv_pool_tokens: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    preemptions: int
    registry_reload_errors: int
    registry_index_error: str
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., loads_in_flight: _Optional[int] = ..., peak_loads_in_flight: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., kv_slots: _Optional[int] = ..., kv_slots_in_use: _Optional[int] = ..., kv_pool_bytes: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., kv_tokens_held: _Optional[int] = ..., kv_pool_tokens: _Optional[int] = ..., prefix_cache_queried_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., preemptions: _Optional[int] = ..., registry_reload_errors: _Optional[int] = ..., registry_index_error: _Optional[str] = ...) -> None: ...
