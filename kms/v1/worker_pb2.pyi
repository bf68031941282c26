from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerError(_message.Message):
    __slots__ = ("kind", "message", "retryable", "field", "reason", "limit", "mechanism")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    retryable: bool
    field: str
    reason: str
    limit: str
    mechanism: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ..., limit: _Optional[str] = ..., mechanism: _Optional[str] = ...) -> None: ...

class ProtectedPan(_message.Message):
    __slots__ = ("sealed", "index", "pan_psn_index", "masked")
    SEALED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PAN_PSN_INDEX_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    sealed: bytes
    index: str
    pan_psn_index: str
    masked: str
    def __init__(self, sealed: _Optional[bytes] = ..., index: _Optional[str] = ..., pan_psn_index: _Optional[str] = ..., masked: _Optional[str] = ...) -> None: ...

class CardFields(_message.Message):
    __slots__ = ("card_ref", "city_code", "card_serial", "pan", "psn", "kdd", "protected")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    CITY_CODE_FIELD_NUMBER: _ClassVar[int]
    CARD_SERIAL_FIELD_NUMBER: _ClassVar[int]
    PAN_FIELD_NUMBER: _ClassVar[int]
    PSN_FIELD_NUMBER: _ClassVar[int]
    KDD_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    city_code: str
    card_serial: str
    pan: str
    psn: str
    kdd: str
    protected: ProtectedPan
    def __init__(self, card_ref: _Optional[str] = ..., city_code: _Optional[str] = ..., card_serial: _Optional[str] = ..., pan: _Optional[str] = ..., psn: _Optional[str] = ..., kdd: _Optional[str] = ..., protected: _Optional[_Union[ProtectedPan, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("card", "serial")
    CARD_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    card: CardFields
    serial: str
    def __init__(self, card: _Optional[_Union[CardFields, _Mapping]] = ..., serial: _Optional[str] = ...) -> None: ...

class KeyVersion(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SealChunkRequest(_message.Message):
    __slots__ = ("jobs", "batch", "bureau", "profile", "pins")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BUREAU_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    batch: str
    bureau: str
    profile: str
    pins: _containers.RepeatedCompositeFieldContainer[KeyVersion]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., batch: _Optional[str] = ..., bureau: _Optional[str] = ..., profile: _Optional[str] = ..., pins: _Optional[_Iterable[_Union[KeyVersion, _Mapping]]] = ...) -> None: ...

class Section(_message.Message):
    __slots__ = ("card_ref", "serial", "section", "error", "worker", "seconds")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    SECTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    serial: str
    section: bytes
    error: WorkerError
    worker: int
    seconds: float
    def __init__(self, card_ref: _Optional[str] = ..., serial: _Optional[str] = ..., section: _Optional[bytes] = ..., error: _Optional[_Union[WorkerError, _Mapping]] = ..., worker: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class HsmCalls(_message.Message):
    __slots__ = ("verb", "seconds", "error")
    VERB_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    verb: _containers.RepeatedScalarFieldContainer[str]
    seconds: _containers.RepeatedScalarFieldContainer[float]
    error: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, verb: _Optional[_Iterable[str]] = ..., seconds: _Optional[_Iterable[float]] = ..., error: _Optional[_Iterable[str]] = ...) -> None: ...

class SealChunkResponse(_message.Message):
    __slots__ = ("sections", "hsm_calls")
    SECTIONS_FIELD_NUMBER: _ClassVar[int]
    HSM_CALLS_FIELD_NUMBER: _ClassVar[int]
    sections: _containers.RepeatedCompositeFieldContainer[Section]
    hsm_calls: HsmCalls
    def __init__(self, sections: _Optional[_Iterable[_Union[Section, _Mapping]]] = ..., hsm_calls: _Optional[_Union[HsmCalls, _Mapping]] = ...) -> None: ...

class CheckComponent(_message.Message):
    __slots__ = ("algorithm", "sealed", "kcv")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    sealed: bytes
    kcv: str
    def __init__(self, algorithm: _Optional[str] = ..., sealed: _Optional[bytes] = ..., kcv: _Optional[str] = ...) -> None: ...

class SignDocument(_message.Message):
    __slots__ = ("label", "message")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    label: str
    message: bytes
    def __init__(self, label: _Optional[str] = ..., message: _Optional[bytes] = ...) -> None: ...

class KeyComponent(_message.Message):
    __slots__ = ("custodian", "sealed", "kcv")
    CUSTODIAN_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    custodian: str
    sealed: bytes
    kcv: str
    def __init__(self, custodian: _Optional[str] = ..., sealed: _Optional[bytes] = ..., kcv: _Optional[str] = ...) -> None: ...

class CreateKey(_message.Message):
    __slots__ = ("kind", "name", "algorithm", "escrow", "expected_kcv", "sealed", "activate")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ESCROW_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_KCV_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    algorithm: str
    escrow: bool
    expected_kcv: str
    sealed: _containers.RepeatedCompositeFieldContainer[KeyComponent]
    activate: bool
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., algorithm: _Optional[str] = ..., escrow: _Optional[bool] = ..., expected_kcv: _Optional[str] = ..., sealed: _Optional[_Iterable[_Union[KeyComponent, _Mapping]]] = ..., activate: _Optional[bool] = ...) -> None: ...

class Recipient(_message.Message):
    __slots__ = ("uri", "public_key_pem")
    URI_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    uri: str
    public_key_pem: str
    def __init__(self, uri: _Optional[str] = ..., public_key_pem: _Optional[str] = ...) -> None: ...

class ExportComponents(_message.Message):
    __slots__ = ("kind", "name", "version", "recipients", "ceremony_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    CEREMONY_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    version: int
    recipients: _containers.RepeatedCompositeFieldContainer[Recipient]
    ceremony_id: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., recipients: _Optional[_Iterable[_Union[Recipient, _Mapping]]] = ..., ceremony_id: _Optional[str] = ...) -> None: ...

class TransportKeyForRsa(_message.Message):
    __slots__ = ("bureau", "recipient_spki", "algorithm")
    BUREAU_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_SPKI_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    bureau: str
    recipient_spki: bytes
    algorithm: str
    def __init__(self, bureau: _Optional[str] = ..., recipient_spki: _Optional[bytes] = ..., algorithm: _Optional[str] = ...) -> None: ...

class KeyRef(_message.Message):
    __slots__ = ("kind", "name", "version")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    version: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PanItem(_message.Message):
    __slots__ = ("card_ref", "pan", "psn")
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    PAN_FIELD_NUMBER: _ClassVar[int]
    PSN_FIELD_NUMBER: _ClassVar[int]
    card_ref: str
    pan: str
    psn: str
    def __init__(self, card_ref: _Optional[str] = ..., pan: _Optional[str] = ..., psn: _Optional[str] = ...) -> None: ...

class ProtectPans(_message.Message):
    __slots__ = ("batch_id", "items")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    items: _containers.RepeatedCompositeFieldContainer[PanItem]
    def __init__(self, batch_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[PanItem, _Mapping]]] = ...) -> None: ...

class GenerateSigningKey(_message.Message):
    __slots__ = ("name", "algorithm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    name: str
    algorithm: str
    def __init__(self, name: _Optional[str] = ..., algorithm: _Optional[str] = ...) -> None: ...

class SignatureAlgorithmsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyOperationRequest(_message.Message):
    __slots__ = ("check_component", "sign", "create_key", "export_components", "transport_key_for_rsa", "discard_key", "destroy_key", "protect_pans", "generate_signing_key", "signature_algorithms", "ceremony_id")
    CHECK_COMPONENT_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    CREATE_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPORT_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_KEY_FOR_RSA_FIELD_NUMBER: _ClassVar[int]
    DISCARD_KEY_FIELD_NUMBER: _ClassVar[int]
    DESTROY_KEY_FIELD_NUMBER: _ClassVar[int]
    PROTECT_PANS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    CEREMONY_ID_FIELD_NUMBER: _ClassVar[int]
    check_component: CheckComponent
    sign: SignDocument
    create_key: CreateKey
    export_components: ExportComponents
    transport_key_for_rsa: TransportKeyForRsa
    discard_key: KeyRef
    destroy_key: KeyRef
    protect_pans: ProtectPans
    generate_signing_key: GenerateSigningKey
    signature_algorithms: SignatureAlgorithmsRequest
    ceremony_id: str
    def __init__(self, check_component: _Optional[_Union[CheckComponent, _Mapping]] = ..., sign: _Optional[_Union[SignDocument, _Mapping]] = ..., create_key: _Optional[_Union[CreateKey, _Mapping]] = ..., export_components: _Optional[_Union[ExportComponents, _Mapping]] = ..., transport_key_for_rsa: _Optional[_Union[TransportKeyForRsa, _Mapping]] = ..., discard_key: _Optional[_Union[KeyRef, _Mapping]] = ..., destroy_key: _Optional[_Union[KeyRef, _Mapping]] = ..., protect_pans: _Optional[_Union[ProtectPans, _Mapping]] = ..., generate_signing_key: _Optional[_Union[GenerateSigningKey, _Mapping]] = ..., signature_algorithms: _Optional[_Union[SignatureAlgorithmsRequest, _Mapping]] = ..., ceremony_id: _Optional[str] = ...) -> None: ...

class KeyResult(_message.Message):
    __slots__ = ("label", "version", "state", "kcv", "kcv_method", "escrow")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    KCV_METHOD_FIELD_NUMBER: _ClassVar[int]
    ESCROW_FIELD_NUMBER: _ClassVar[int]
    label: str
    version: int
    state: str
    kcv: str
    kcv_method: str
    escrow: str
    def __init__(self, label: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., kcv: _Optional[str] = ..., kcv_method: _Optional[str] = ..., escrow: _Optional[str] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Components(_message.Message):
    __slots__ = ("components",)
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    components: _containers.RepeatedCompositeFieldContainer[KeyComponent]
    def __init__(self, components: _Optional[_Iterable[_Union[KeyComponent, _Mapping]]] = ...) -> None: ...

class HandedKey(_message.Message):
    __slots__ = ("key", "wrapped")
    KEY_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    key: KeyResult
    wrapped: bytes
    def __init__(self, key: _Optional[_Union[KeyResult, _Mapping]] = ..., wrapped: _Optional[bytes] = ...) -> None: ...

class ProtectedPans(_message.Message):
    __slots__ = ("pans",)
    PANS_FIELD_NUMBER: _ClassVar[int]
    pans: _containers.RepeatedCompositeFieldContainer[ProtectedPan]
    def __init__(self, pans: _Optional[_Iterable[_Union[ProtectedPan, _Mapping]]] = ...) -> None: ...

class SigningKey(_message.Message):
    __slots__ = ("label", "version", "state", "algorithm", "public_key")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    label: str
    version: int
    state: str
    algorithm: str
    public_key: bytes
    def __init__(self, label: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., algorithm: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class SignatureAlgorithms(_message.Message):
    __slots__ = ("algorithms",)
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    algorithms: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, algorithms: _Optional[_Iterable[str]] = ...) -> None: ...

class KeyOperationResponse(_message.Message):
    __slots__ = ("done", "signature", "key", "components", "handed", "pans", "signing_key", "algorithms")
    DONE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    HANDED_FIELD_NUMBER: _ClassVar[int]
    PANS_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    done: Done
    signature: bytes
    key: KeyResult
    components: Components
    handed: HandedKey
    pans: ProtectedPans
    signing_key: SigningKey
    algorithms: SignatureAlgorithms
    def __init__(self, done: _Optional[_Union[Done, _Mapping]] = ..., signature: _Optional[bytes] = ..., key: _Optional[_Union[KeyResult, _Mapping]] = ..., components: _Optional[_Union[Components, _Mapping]] = ..., handed: _Optional[_Union[HandedKey, _Mapping]] = ..., pans: _Optional[_Union[ProtectedPans, _Mapping]] = ..., signing_key: _Optional[_Union[SigningKey, _Mapping]] = ..., algorithms: _Optional[_Union[SignatureAlgorithms, _Mapping]] = ...) -> None: ...

class RecycleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RecycleResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("serves", "failing", "refused", "processes", "restarts", "pids")
    SERVES_FIELD_NUMBER: _ClassVar[int]
    FAILING_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    serves: str
    failing: str
    refused: bool
    processes: int
    restarts: int
    pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, serves: _Optional[str] = ..., failing: _Optional[str] = ..., refused: _Optional[bool] = ..., processes: _Optional[int] = ..., restarts: _Optional[int] = ..., pids: _Optional[_Iterable[int]] = ...) -> None: ...

class SignedHeadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignedHeadResponse(_message.Message):
    __slots__ = ("size", "head")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    size: int
    head: str
    def __init__(self, size: _Optional[int] = ..., head: _Optional[str] = ...) -> None: ...

class SignedHeadBase(_message.Message):
    __slots__ = ("size", "head")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    size: int
    head: str
    def __init__(self, size: _Optional[int] = ..., head: _Optional[str] = ...) -> None: ...

class SignCheckpointRequest(_message.Message):
    __slots__ = ("size", "head", "at", "digests", "base")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    size: int
    head: str
    at: str
    digests: _containers.RepeatedScalarFieldContainer[bytes]
    base: SignedHeadBase
    def __init__(self, size: _Optional[int] = ..., head: _Optional[str] = ..., at: _Optional[str] = ..., digests: _Optional[_Iterable[bytes]] = ..., base: _Optional[_Union[SignedHeadBase, _Mapping]] = ...) -> None: ...

class SignSealRequest(_message.Message):
    __slots__ = ("size", "head", "at", "nonce", "filters", "digests", "base")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    size: int
    head: str
    at: str
    nonce: str
    filters: _containers.ScalarMap[str, str]
    digests: _containers.RepeatedScalarFieldContainer[bytes]
    base: SignedHeadBase
    def __init__(self, size: _Optional[int] = ..., head: _Optional[str] = ..., at: _Optional[str] = ..., nonce: _Optional[str] = ..., filters: _Optional[_Mapping[str, str]] = ..., digests: _Optional[_Iterable[bytes]] = ..., base: _Optional[_Union[SignedHeadBase, _Mapping]] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...
