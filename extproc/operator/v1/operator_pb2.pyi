from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_FITS: _ClassVar[Reason]
    REASON_TOO_LARGE: _ClassVar[Reason]
    REASON_UNREADABLE: _ClassVar[Reason]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_CALIBRATED: _ClassVar[Source]
    SOURCE_PRIOR: _ClassVar[Source]
    SOURCE_EXACT: _ClassVar[Source]
    SOURCE_FIXED: _ClassVar[Source]
    SOURCE_FALLBACK: _ClassVar[Source]
    SOURCE_BOUND: _ClassVar[Source]
REASON_UNSPECIFIED: Reason
REASON_FITS: Reason
REASON_TOO_LARGE: Reason
REASON_UNREADABLE: Reason
SOURCE_UNSPECIFIED: Source
SOURCE_CALIBRATED: Source
SOURCE_PRIOR: Source
SOURCE_EXACT: Source
SOURCE_FIXED: Source
SOURCE_FALLBACK: Source
SOURCE_BOUND: Source

class ExplainRequest(_message.Message):
    __slots__ = ("body", "path")
    BODY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    path: str
    def __init__(self, body: _Optional[bytes] = ..., path: _Optional[str] = ...) -> None: ...

class PoolState(_message.Message):
    __slots__ = ("name", "max_context", "holds", "in_flight", "queue_per_instance", "kv_cache_usage", "instances", "load_age_s", "fresh", "under_pressure", "queue_threshold", "kv_cache_threshold")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_PER_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    LOAD_AGE_S_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    UNDER_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_context: int
    holds: bool
    in_flight: int
    queue_per_instance: float
    kv_cache_usage: float
    instances: int
    load_age_s: float
    fresh: bool
    under_pressure: bool
    queue_threshold: float
    kv_cache_threshold: float
    def __init__(self, name: _Optional[str] = ..., max_context: _Optional[int] = ..., holds: _Optional[bool] = ..., in_flight: _Optional[int] = ..., queue_per_instance: _Optional[float] = ..., kv_cache_usage: _Optional[float] = ..., instances: _Optional[int] = ..., load_age_s: _Optional[float] = ..., fresh: _Optional[bool] = ..., under_pressure: _Optional[bool] = ..., queue_threshold: _Optional[float] = ..., kv_cache_threshold: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("pool", "decided_pool", "spilled_from", "shadow", "reason", "source", "prompt_tokens", "conservative_prompt_tokens", "output_reserve_tokens", "budget_tokens", "margin", "content_kind", "model", "api", "family", "calibration_key", "calibration_samples", "size_bound_tokens", "pools", "detail")
    POOL_FIELD_NUMBER: _ClassVar[int]
    DECIDED_POOL_FIELD_NUMBER: _ClassVar[int]
    SPILLED_FROM_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONSERVATIVE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_RESERVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    CONTENT_KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_KEY_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BOUND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    decided_pool: str
    spilled_from: str
    shadow: bool
    reason: Reason
    source: Source
    prompt_tokens: int
    conservative_prompt_tokens: int
    output_reserve_tokens: int
    budget_tokens: int
    margin: float
    content_kind: str
    model: str
    api: str
    family: str
    calibration_key: str
    calibration_samples: int
    size_bound_tokens: int
    pools: _containers.RepeatedCompositeFieldContainer[PoolState]
    detail: str
    def __init__(self, pool: _Optional[str] = ..., decided_pool: _Optional[str] = ..., spilled_from: _Optional[str] = ..., shadow: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., source: _Optional[_Union[Source, str]] = ..., prompt_tokens: _Optional[int] = ..., conservative_prompt_tokens: _Optional[int] = ..., output_reserve_tokens: _Optional[int] = ..., budget_tokens: _Optional[int] = ..., margin: _Optional[float] = ..., content_kind: _Optional[str] = ..., model: _Optional[str] = ..., api: _Optional[str] = ..., family: _Optional[str] = ..., calibration_key: _Optional[str] = ..., calibration_samples: _Optional[int] = ..., size_bound_tokens: _Optional[int] = ..., pools: _Optional[_Iterable[_Union[PoolState, _Mapping]]] = ..., detail: _Optional[str] = ...) -> None: ...

class GetCalibrationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("estimator", "snapshot_json", "keys")
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_JSON_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    estimator: str
    snapshot_json: bytes
    keys: _containers.RepeatedCompositeFieldContainer[KeyCalibration]
    def __init__(self, estimator: _Optional[str] = ..., snapshot_json: _Optional[bytes] = ..., keys: _Optional[_Iterable[_Union[KeyCalibration, _Mapping]]] = ...) -> None: ...

class KeyCalibration(_message.Message):
    __slots__ = ("key", "samples", "summary_json", "learning")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    LEARNING_FIELD_NUMBER: _ClassVar[int]
    key: str
    samples: int
    summary_json: bytes
    learning: KeyLearning
    def __init__(self, key: _Optional[str] = ..., samples: _Optional[int] = ..., summary_json: _Optional[bytes] = ..., learning: _Optional[_Union[KeyLearning, _Mapping]] = ...) -> None: ...

class KeyLearning(_message.Message):
    __slots__ = ("window", "client_share", "recent", "unidentified", "refused", "unexplained", "clients")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SHARE_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    UNIDENTIFIED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    UNEXPLAINED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    window: int
    client_share: float
    recent: int
    unidentified: int
    refused: int
    unexplained: int
    clients: _containers.RepeatedCompositeFieldContainer[ClientLearning]
    def __init__(self, window: _Optional[int] = ..., client_share: _Optional[float] = ..., recent: _Optional[int] = ..., unidentified: _Optional[int] = ..., refused: _Optional[int] = ..., unexplained: _Optional[int] = ..., clients: _Optional[_Iterable[_Union[ClientLearning, _Mapping]]] = ...) -> None: ...

class ClientLearning(_message.Message):
    __slots__ = ("client_hash", "recent", "share", "refused", "unexplained")
    CLIENT_HASH_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    UNEXPLAINED_FIELD_NUMBER: _ClassVar[int]
    client_hash: str
    recent: int
    share: float
    refused: int
    unexplained: int
    def __init__(self, client_hash: _Optional[str] = ..., recent: _Optional[int] = ..., share: _Optional[float] = ..., refused: _Optional[int] = ..., unexplained: _Optional[int] = ...) -> None: ...

class RestoreCalibrationRequest(_message.Message):
    __slots__ = ("snapshot_json",)
    SNAPSHOT_JSON_FIELD_NUMBER: _ClassVar[int]
    snapshot_json: bytes
    def __init__(self, snapshot_json: _Optional[bytes] = ...) -> None: ...

class ResetCalibrationRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...
