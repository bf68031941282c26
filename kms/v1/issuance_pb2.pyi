from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CardIdentity(_message.Message):
    __slots__ = ("card_ref", "city_code", "card_serial", "pan", "psn", "kdd")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    CITY_CODE_FIELD_NUMBER: _ClassVar[int]
    CARD_SERIAL_FIELD_NUMBER: _ClassVar[int]
    PAN_FIELD_NUMBER: _ClassVar[int]
    PSN_FIELD_NUMBER: _ClassVar[int]
    KDD_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    city_code: str
    card_serial: str
    pan: str
    psn: str
    kdd: str
    def __init__(self, card_ref: _Optional[str] = ..., city_code: _Optional[str] = ..., card_serial: _Optional[str] = ..., pan: _Optional[str] = ..., psn: _Optional[str] = ..., kdd: _Optional[str] = ...) -> None: ...

class ChipData(_message.Message):
    __slots__ = ("card_serial", "kdd")
    CARD_SERIAL_FIELD_NUMBER: _ClassVar[int]
    KDD_FIELD_NUMBER: _ClassVar[int]
    card_serial: str
    kdd: str
    def __init__(self, card_serial: _Optional[str] = ..., kdd: _Optional[str] = ...) -> None: ...

class SealedBundle(_message.Message):
    __slots__ = ("card_ref", "serial", "data", "sequence")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    serial: str
    data: bytes
    sequence: int
    def __init__(self, card_ref: _Optional[str] = ..., serial: _Optional[str] = ..., data: _Optional[bytes] = ..., sequence: _Optional[int] = ...) -> None: ...

class IssueCardRequest(_message.Message):
    __slots__ = ("batch_id", "card_ref", "chip", "idempotency_key")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    card_ref: str
    chip: ChipData
    idempotency_key: str
    def __init__(self, batch_id: _Optional[str] = ..., card_ref: _Optional[str] = ..., chip: _Optional[_Union[ChipData, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class IssueCardResponse(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: SealedBundle
    def __init__(self, bundle: _Optional[_Union[SealedBundle, _Mapping]] = ...) -> None: ...

class StreamBatchRequest(_message.Message):
    __slots__ = ("batch_id", "cursor", "max_bundles_per_message")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MAX_BUNDLES_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    cursor: str
    max_bundles_per_message: int
    def __init__(self, batch_id: _Optional[str] = ..., cursor: _Optional[str] = ..., max_bundles_per_message: _Optional[int] = ...) -> None: ...

class StreamBatchResponse(_message.Message):
    __slots__ = ("bundles", "cursor")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[SealedBundle]
    cursor: str
    def __init__(self, bundles: _Optional[_Iterable[_Union[SealedBundle, _Mapping]]] = ..., cursor: _Optional[str] = ...) -> None: ...

class GetBatchStatusRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class BatchStatus(_message.Message):
    __slots__ = ("batch_id", "bureau", "profile", "cards", "issued", "state", "created_by", "created_at")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    BUREAU_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    bureau: str
    profile: str
    cards: int
    issued: int
    state: str
    created_by: str
    created_at: str
    def __init__(self, batch_id: _Optional[str] = ..., bureau: _Optional[str] = ..., profile: _Optional[str] = ..., cards: _Optional[int] = ..., issued: _Optional[int] = ..., state: _Optional[str] = ..., created_by: _Optional[str] = ..., created_at: _Optional[str] = ...) -> None: ...

class CreateBatchRequest(_message.Message):
    __slots__ = ("batch_id", "bureau", "profile", "cards")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    BUREAU_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    bureau: str
    profile: str
    cards: _containers.RepeatedCompositeFieldContainer[CardIdentity]
    def __init__(self, batch_id: _Optional[str] = ..., bureau: _Optional[str] = ..., profile: _Optional[str] = ..., cards: _Optional[_Iterable[_Union[CardIdentity, _Mapping]]] = ...) -> None: ...

class ReissueCardRequest(_message.Message):
    __slots__ = ("batch_id", "card_ref")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    card_ref: str
    def __init__(self, batch_id: _Optional[str] = ..., card_ref: _Optional[str] = ...) -> None: ...

class ReissueCardResponse(_message.Message):
    __slots__ = ("card_ref", "state", "awaiting")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AWAITING_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    state: str
    awaiting: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, card_ref: _Optional[str] = ..., state: _Optional[str] = ..., awaiting: _Optional[_Iterable[str]] = ...) -> None: ...
