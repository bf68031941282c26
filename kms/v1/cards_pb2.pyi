from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReportLostRequest(_message.Message):
    __slots__ = ("card_ref", "application", "reason")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    application: str
    reason: str
    def __init__(self, card_ref: _Optional[str] = ..., application: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelLossReportRequest(_message.Message):
    __slots__ = ("card_ref", "application", "reason")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    application: str
    reason: str
    def __init__(self, card_ref: _Optional[str] = ..., application: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReplaceCardRequest(_message.Message):
    __slots__ = ("old_card_ref", "new_card_ref", "reason")
    OLD_CARD_REF_FIELD_NUMBER: _ClassVar[int]
    NEW_CARD_REF_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    old_card_ref: str
    new_card_ref: str
    reason: str
    def __init__(self, old_card_ref: _Optional[str] = ..., new_card_ref: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelApplicationRequest(_message.Message):
    __slots__ = ("card_ref", "application", "kind", "reason")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    application: str
    kind: str
    reason: str
    def __init__(self, card_ref: _Optional[str] = ..., application: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetCardRequest(_message.Message):
    __slots__ = ("card_ref",)
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    def __init__(self, card_ref: _Optional[str] = ...) -> None: ...

class ApplicationState(_message.Message):
    __slots__ = ("application", "state", "since")
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    application: str
    state: str
    since: str
    def __init__(self, application: _Optional[str] = ..., state: _Optional[str] = ..., since: _Optional[str] = ...) -> None: ...

class CardRecordState(_message.Message):
    __slots__ = ("batch_id", "state", "serial")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    state: str
    serial: str
    def __init__(self, batch_id: _Optional[str] = ..., state: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...

class LifecycleEvent(_message.Message):
    __slots__ = ("id", "application", "event", "from_state", "to_state", "reason", "detail", "at", "by")
    ID_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    id: int
    application: str
    event: str
    from_state: str
    to_state: str
    reason: str
    detail: str
    at: str
    by: str
    def __init__(self, id: _Optional[int] = ..., application: _Optional[str] = ..., event: _Optional[str] = ..., from_state: _Optional[str] = ..., to_state: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., at: _Optional[str] = ..., by: _Optional[str] = ...) -> None: ...

class Card(_message.Message):
    __slots__ = ("card_ref", "applications", "replaced_by", "replaces", "records", "history", "awaiting_consent")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    APPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BY_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    AWAITING_CONSENT_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    applications: _containers.RepeatedCompositeFieldContainer[ApplicationState]
    replaced_by: str
    replaces: str
    records: _containers.RepeatedCompositeFieldContainer[CardRecordState]
    history: _containers.RepeatedCompositeFieldContainer[LifecycleEvent]
    awaiting_consent: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, card_ref: _Optional[str] = ..., applications: _Optional[_Iterable[_Union[ApplicationState, _Mapping]]] = ..., replaced_by: _Optional[str] = ..., replaces: _Optional[str] = ..., records: _Optional[_Iterable[_Union[CardRecordState, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[LifecycleEvent, _Mapping]]] = ..., awaiting_consent: _Optional[_Iterable[str]] = ...) -> None: ...
