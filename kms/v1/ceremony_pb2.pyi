from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransportKeyRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class TransportKeyHandoff(_message.Message):
    __slots__ = ("domain", "bureau", "version", "label", "wrapped_key", "kcv", "algorithm", "unwrap_key_sha256")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUREAU_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    UNWRAP_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    domain: str
    bureau: str
    version: int
    label: str
    wrapped_key: bytes
    kcv: str
    algorithm: str
    unwrap_key_sha256: str
    def __init__(self, domain: _Optional[str] = ..., bureau: _Optional[str] = ..., version: _Optional[int] = ..., label: _Optional[str] = ..., wrapped_key: _Optional[bytes] = ..., kcv: _Optional[str] = ..., algorithm: _Optional[str] = ..., unwrap_key_sha256: _Optional[str] = ...) -> None: ...

class ConfirmTransportKeyRequest(_message.Message):
    __slots__ = ("domain", "version", "kcv")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    domain: str
    version: int
    kcv: str
    def __init__(self, domain: _Optional[str] = ..., version: _Optional[int] = ..., kcv: _Optional[str] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("operation", "params_json", "ttl_seconds")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    operation: str
    params_json: str
    ttl_seconds: int
    def __init__(self, operation: _Optional[str] = ..., params_json: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CeremonyRef(_message.Message):
    __slots__ = ("ceremony_id",)
    CEREMONY_ID_FIELD_NUMBER: _ClassVar[int]
    ceremony_id: str
    def __init__(self, ceremony_id: _Optional[str] = ...) -> None: ...

class ListCeremoniesRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ListCeremoniesResponse(_message.Message):
    __slots__ = ("ceremonies",)
    CEREMONIES_FIELD_NUMBER: _ClassVar[int]
    ceremonies: _containers.RepeatedCompositeFieldContainer[Ceremony]
    def __init__(self, ceremonies: _Optional[_Iterable[_Union[Ceremony, _Mapping]]] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("ceremony_id", "signature")
    CEREMONY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ceremony_id: str
    signature: bytes
    def __init__(self, ceremony_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SubmitComponentRequest(_message.Message):
    __slots__ = ("ceremony_id", "encrypted_component", "kcv")
    CEREMONY_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_COMPONENT_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    ceremony_id: str
    encrypted_component: bytes
    kcv: str
    def __init__(self, ceremony_id: _Optional[str] = ..., encrypted_component: _Optional[bytes] = ..., kcv: _Optional[str] = ...) -> None: ...

class ApprovalInfo(_message.Message):
    __slots__ = ("officer", "at")
    OFFICER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    officer: str
    at: str
    def __init__(self, officer: _Optional[str] = ..., at: _Optional[str] = ...) -> None: ...

class ComponentInfo(_message.Message):
    __slots__ = ("custodian", "kcv", "at")
    CUSTODIAN_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    custodian: str
    kcv: str
    at: str
    def __init__(self, custodian: _Optional[str] = ..., kcv: _Optional[str] = ..., at: _Optional[str] = ...) -> None: ...

class Ceremony(_message.Message):
    __slots__ = ("ceremony_id", "domain", "operation", "params_json", "proposer", "created_at", "expires_at", "state", "encoding", "digest", "required", "role", "approvals", "components", "result_json", "error")
    CEREMONY_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ceremony_id: str
    domain: str
    operation: str
    params_json: str
    proposer: str
    created_at: str
    expires_at: str
    state: str
    encoding: bytes
    digest: str
    required: int
    role: str
    approvals: _containers.RepeatedCompositeFieldContainer[ApprovalInfo]
    components: _containers.RepeatedCompositeFieldContainer[ComponentInfo]
    result_json: str
    error: str
    def __init__(self, ceremony_id: _Optional[str] = ..., domain: _Optional[str] = ..., operation: _Optional[str] = ..., params_json: _Optional[str] = ..., proposer: _Optional[str] = ..., created_at: _Optional[str] = ..., expires_at: _Optional[str] = ..., state: _Optional[str] = ..., encoding: _Optional[bytes] = ..., digest: _Optional[str] = ..., required: _Optional[int] = ..., role: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[ApprovalInfo, _Mapping]]] = ..., components: _Optional[_Iterable[_Union[ComponentInfo, _Mapping]]] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class SealedComponent(_message.Message):
    __slots__ = ("ceremony_id", "sealed", "kcv")
    CEREMONY_ID_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    KCV_FIELD_NUMBER: _ClassVar[int]
    ceremony_id: str
    sealed: bytes
    kcv: str
    def __init__(self, ceremony_id: _Optional[str] = ..., sealed: _Optional[bytes] = ..., kcv: _Optional[str] = ...) -> None: ...

class Minutes(_message.Message):
    __slots__ = ("document", "signature", "signing_key")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    signature: bytes
    signing_key: str
    def __init__(self, document: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signing_key: _Optional[str] = ...) -> None: ...

class GetDomainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OfficerInfo(_message.Message):
    __slots__ = ("officer", "roles", "public_key", "state")
    OFFICER_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    officer: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    public_key: str
    state: str
    def __init__(self, officer: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., public_key: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class DomainInfo(_message.Message):
    __slots__ = ("domain", "custody_public_key", "officers")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CUSTODY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    OFFICERS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    custody_public_key: bytes
    officers: _containers.RepeatedCompositeFieldContainer[OfficerInfo]
    def __init__(self, domain: _Optional[str] = ..., custody_public_key: _Optional[bytes] = ..., officers: _Optional[_Iterable[_Union[OfficerInfo, _Mapping]]] = ...) -> None: ...
