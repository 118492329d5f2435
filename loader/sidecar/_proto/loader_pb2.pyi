from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Origin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORIGIN_UNSPECIFIED: _ClassVar[Origin]
    ORIGIN_STAGED: _ClassVar[Origin]
    ORIGIN_JOINED: _ClassVar[Origin]
    ORIGIN_CACHED: _ClassVar[Origin]

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[State]
    STATE_STAGING: _ClassVar[State]
    STATE_READY: _ClassVar[State]
    STATE_FAILED: _ClassVar[State]
ORIGIN_UNSPECIFIED: Origin
ORIGIN_STAGED: Origin
ORIGIN_JOINED: Origin
ORIGIN_CACHED: Origin
STATE_UNSPECIFIED: State
STATE_STAGING: State
STATE_READY: State
STATE_FAILED: State

class StageRequest(_message.Message):
    __slots__ = ("uri", "tp_rank", "tp_size", "order", "rate_bytes_per_s", "digests", "detach")
    class DigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    URI_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    uri: str
    tp_rank: int
    tp_size: int
    order: str
    rate_bytes_per_s: float
    digests: _containers.ScalarMap[str, str]
    detach: bool
    def __init__(self, uri: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., order: _Optional[str] = ..., rate_bytes_per_s: _Optional[float] = ..., digests: _Optional[_Mapping[str, str]] = ..., detach: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "tensors_done", "tensors_total", "elapsed_s", "gbps")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    GBPS_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    elapsed_s: float
    gbps: float
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., gbps: _Optional[float] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Staged(_message.Message):
    __slots__ = ("checkpoint_id", "segment_path", "segment_bytes", "token", "tensors", "origin", "staging_s")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_PATH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    STAGING_S_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    segment_path: str
    segment_bytes: int
    token: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    origin: Origin
    staging_s: float
    def __init__(self, checkpoint_id: _Optional[str] = ..., segment_path: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., token: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., origin: _Optional[_Union[Origin, str]] = ..., staging_s: _Optional[float] = ...) -> None: ...

class StageEvent(_message.Message):
    __slots__ = ("progress", "staged")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    staged: Staged
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., staged: _Optional[_Union[Staged, _Mapping]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("checkpoint_id", "uri", "tp_rank", "tp_size", "bytes", "state", "age_s", "bytes_done", "num_loads", "error")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_LOADS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    uri: str
    tp_rank: int
    tp_size: int
    bytes: int
    state: State
    age_s: float
    bytes_done: int
    num_loads: int
    error: str
    def __init__(self, checkpoint_id: _Optional[str] = ..., uri: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., bytes: _Optional[int] = ..., state: _Optional[_Union[State, str]] = ..., age_s: _Optional[float] = ..., bytes_done: _Optional[int] = ..., num_loads: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("checkpoint_id",)
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    def __init__(self, checkpoint_id: _Optional[str] = ...) -> None: ...

class EvictReply(_message.Message):
    __slots__ = ("bytes_freed",)
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    bytes_freed: int
    def __init__(self, bytes_freed: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("serving", "staged_bytes", "staging_bytes", "capacity_bytes", "num_checkpoints", "num_stagings", "version", "pid")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGINGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    staged_bytes: int
    staging_bytes: int
    capacity_bytes: int
    num_checkpoints: int
    num_stagings: int
    version: str
    pid: int
    def __init__(self, serving: _Optional[bool] = ..., staged_bytes: _Optional[int] = ..., staging_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., num_checkpoints: _Optional[int] = ..., num_stagings: _Optional[int] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class FilesRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("path", "size", "identity", "prefix_bytes", "prefix_sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    identity: str
    prefix_bytes: int
    prefix_sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., identity: _Optional[str] = ..., prefix_bytes: _Optional[int] = ..., prefix_sha256: _Optional[str] = ...) -> None: ...

class FilesReply(_message.Message):
    __slots__ = ("checkpoint_id", "token", "files", "tensors")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    token: bytes
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDigest]
    def __init__(self, checkpoint_id: _Optional[str] = ..., token: _Optional[bytes] = ..., files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorDigest, _Mapping]]] = ...) -> None: ...

class TensorDigest(_message.Message):
    __slots__ = ("name", "path", "offset", "nbytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    offset: int
    nbytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("uri", "path", "offset", "length", "token")
    URI_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    uri: str
    path: str
    offset: int
    length: int
    token: bytes
    def __init__(self, uri: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class ReadChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
