from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TIER_UNSPECIFIED: _ClassVar[AdapterTier]
    ADAPTER_TIER_DISK: _ClassVar[AdapterTier]
    ADAPTER_TIER_HOST: _ClassVar[AdapterTier]
    ADAPTER_TIER_DEVICE: _ClassVar[AdapterTier]

class MergeMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_METHOD_UNSPECIFIED: _ClassVar[MergeMethod]
    MERGE_METHOD_LINEAR: _ClassVar[MergeMethod]
    MERGE_METHOD_TIES: _ClassVar[MergeMethod]
    MERGE_METHOD_DARE_TIES: _ClassVar[MergeMethod]
    MERGE_METHOD_BREADCRUMBS: _ClassVar[MergeMethod]
ADAPTER_TIER_UNSPECIFIED: AdapterTier
ADAPTER_TIER_DISK: AdapterTier
ADAPTER_TIER_HOST: AdapterTier
ADAPTER_TIER_DEVICE: AdapterTier
MERGE_METHOD_UNSPECIFIED: MergeMethod
MERGE_METHOD_LINEAR: MergeMethod
MERGE_METHOD_TIES: MergeMethod
MERGE_METHOD_DARE_TIES: MergeMethod
MERGE_METHOD_BREADCRUMBS: MergeMethod

class AdapterInfo(_message.Message):
    __slots__ = ("name", "rank", "target_modules", "tier", "content_hash", "in_use", "path", "experts", "format", "compression_ratio")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    tier: AdapterTier
    content_hash: str
    in_use: int
    path: str
    experts: _containers.RepeatedScalarFieldContainer[str]
    format: str
    compression_ratio: float
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., tier: _Optional[_Union[AdapterTier, str]] = ..., content_hash: _Optional[str] = ..., in_use: _Optional[int] = ..., path: _Optional[str] = ..., experts: _Optional[_Iterable[str]] = ..., format: _Optional[str] = ..., compression_ratio: _Optional[float] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class MergeAdaptersRequest(_message.Message):
    __slots__ = ("name", "adapters", "weights", "method", "rank", "density", "gamma", "seed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    method: MergeMethod
    rank: int
    density: float
    gamma: float
    seed: int
    def __init__(self, name: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., method: _Optional[_Union[MergeMethod, str]] = ..., rank: _Optional[int] = ..., density: _Optional[float] = ..., gamma: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ProjectionError(_message.Message):
    __slots__ = ("module", "relative_error")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    module: str
    relative_error: float
    def __init__(self, module: _Optional[str] = ..., relative_error: _Optional[float] = ...) -> None: ...

class MergeAdaptersResponse(_message.Message):
    __slots__ = ("adapter", "errors")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    errors: _containers.RepeatedCompositeFieldContainer[ProjectionError]
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., errors: _Optional[_Iterable[_Union[ProjectionError, _Mapping]]] = ...) -> None: ...

class CompressAdapterRequest(_message.Message):
    __slots__ = ("name", "source", "density")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    density: float
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., density: _Optional[float] = ...) -> None: ...

class CompressAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...
