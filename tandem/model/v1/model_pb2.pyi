from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_EMBEDDING: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_TOKEN_CLASSIFICATION: _ClassVar[Task]
    TASK_RERANK: _ClassVar[Task]
TASK_UNSPECIFIED: Task
TASK_EMBEDDING: Task
TASK_CLASSIFICATION: Task
TASK_TOKEN_CLASSIFICATION: Task
TASK_RERANK: Task

class ModelInfo(_message.Message):
    __slots__ = ("name", "task", "versions", "version", "max_input_length", "embedding_dimension", "labels", "ready", "backend", "multi_label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MULTI_LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: Task
    versions: _containers.RepeatedScalarFieldContainer[str]
    version: str
    max_input_length: int
    embedding_dimension: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    backend: str
    multi_label: bool
    def __init__(self, name: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., versions: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., max_input_length: _Optional[int] = ..., embedding_dimension: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., backend: _Optional[str] = ..., multi_label: _Optional[bool] = ...) -> None: ...
