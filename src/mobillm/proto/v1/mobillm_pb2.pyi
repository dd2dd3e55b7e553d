from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenSessionRequest(_message.Message):
    __slots__ = ("spec_json",)
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    def __init__(self, spec_json: _Optional[str] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id", "token", "need_head", "max_chunk_bytes", "server")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEED_HEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    need_head: bool
    max_chunk_bytes: int
    server: str
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., need_head: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ..., server: _Optional[str] = ...) -> None: ...

class HeadChunk(_message.Message):
    __slots__ = ("session_id", "seq", "last", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    last: bool
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., last: _Optional[bool] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeadReply(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class StepBegin(_message.Message):
    __slots__ = ("session_id", "step", "rows_per_sample", "pool_rows", "labels", "targets", "validation", "loss_mask", "replay_of")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    POOL_ROWS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    REPLAY_OF_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    rows_per_sample: bytes
    pool_rows: bytes
    labels: bytes
    targets: bytes
    validation: bool
    loss_mask: bytes
    replay_of: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., rows_per_sample: _Optional[bytes] = ..., pool_rows: _Optional[bytes] = ..., labels: _Optional[bytes] = ..., targets: _Optional[bytes] = ..., validation: _Optional[bool] = ..., loss_mask: _Optional[bytes] = ..., replay_of: _Optional[int] = ...) -> None: ...

class ActivationChunk(_message.Message):
    __slots__ = ("session_id", "step", "tap", "seq", "last", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TAP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    tap: int
    seq: int
    last: bool
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., tap: _Optional[int] = ..., seq: _Optional[int] = ..., last: _Optional[bool] = ..., data: _Optional[bytes] = ...) -> None: ...

class Gradient(_message.Message):
    __slots__ = ("session_id", "step", "data", "device_sq_norm")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SQ_NORM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    data: bytes
    device_sq_norm: float
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., data: _Optional[bytes] = ..., device_sq_norm: _Optional[float] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("begin", "chunk", "gradient")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    begin: StepBegin
    chunk: ActivationChunk
    gradient: Gradient
    def __init__(self, begin: _Optional[_Union[StepBegin, _Mapping]] = ..., chunk: _Optional[_Union[ActivationChunk, _Mapping]] = ..., gradient: _Optional[_Union[Gradient, _Mapping]] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("step", "rows", "data")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    step: int
    rows: int
    data: bytes
    def __init__(self, step: _Optional[int] = ..., rows: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("ack", "features")
    ACK_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    features: Features
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., features: _Optional[_Union[Features, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("step", "loss", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResumeReply(_message.Message):
    __slots__ = ("steps_done", "optimizer_steps", "need_head", "last_ack")
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    NEED_HEAD_FIELD_NUMBER: _ClassVar[int]
    LAST_ACK_FIELD_NUMBER: _ClassVar[int]
    steps_done: int
    optimizer_steps: int
    need_head: bool
    last_ack: Ack
    def __init__(self, steps_done: _Optional[int] = ..., optimizer_steps: _Optional[int] = ..., need_head: _Optional[bool] = ..., last_ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class EpochReport(_message.Message):
    __slots__ = ("epoch", "metrics", "last")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    metrics: _containers.ScalarMap[str, float]
    last: bool
    def __init__(self, epoch: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., last: _Optional[bool] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("seq", "last", "data", "meta_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    last: bool
    data: bytes
    meta_json: str
    def __init__(self, seq: _Optional[int] = ..., last: _Optional[bool] = ..., data: _Optional[bytes] = ..., meta_json: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ("summary", "notes")
    class SummaryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class NotesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    summary: _containers.ScalarMap[str, float]
    notes: _containers.ScalarMap[str, str]
    def __init__(self, summary: _Optional[_Mapping[str, float]] = ..., notes: _Optional[_Mapping[str, str]] = ...) -> None: ...
