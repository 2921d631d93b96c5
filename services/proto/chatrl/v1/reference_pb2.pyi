from chatrl.services.proto.chatrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogProbsSequence(_message.Message):
    __slots__ = ("token_ids", "response_start")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_START_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_start: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., response_start: _Optional[int] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("sequences", "temperature")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[LogProbsSequence]
    temperature: float
    def __init__(self, sequences: _Optional[_Iterable[_Union[LogProbsSequence, _Mapping]]] = ..., temperature: _Optional[float] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("logprobs", "model_version")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    model_version: int
    def __init__(self, logprobs: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ReferenceModelServiceLoadModelRequest(_message.Message):
    __slots__ = ("checkpoint_uri", "model_version", "sha256")
    CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    checkpoint_uri: str
    model_version: int
    sha256: str
    def __init__(self, checkpoint_uri: _Optional[str] = ..., model_version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ReferenceModelServiceLoadModelResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.ModelInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ReferenceModelServiceGetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReferenceModelServiceGetModelInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.ModelInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
