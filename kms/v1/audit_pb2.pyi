from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ExportRequest(_message.Message):
    __slots__ = ("since", "until", "domain", "kind", "nonce")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    since: str
    until: str
    domain: str
    kind: str
    nonce: str
    def __init__(self, since: _Optional[str] = ..., until: _Optional[str] = ..., domain: _Optional[str] = ..., kind: _Optional[str] = ..., nonce: _Optional[str] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lines: _Optional[_Iterable[str]] = ...) -> None: ...

class GetHeadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Head(_message.Message):
    __slots__ = ("size", "hash", "checkpoint_size", "checkpoint_at", "checkpoint")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_AT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    size: int
    hash: str
    checkpoint_size: int
    checkpoint_at: str
    checkpoint: str
    def __init__(self, size: _Optional[int] = ..., hash: _Optional[str] = ..., checkpoint_size: _Optional[int] = ..., checkpoint_at: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...
