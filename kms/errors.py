"""One error tree for kms, and the one place that maps it to gRPC status codes (both ways) and CLI exit codes.

Messages never carry key material, PINs or components: they name what failed and why, nothing more.
"""

from __future__ import annotations

import re
from collections.abc import Callable


class KmsError(Exception):
    """Base of every error kms raises on purpose."""

    #: gRPC status code name (grpc.StatusCode[...]); mapped in kms.server.frame, kept as text here so the core
    #: does not import grpc.
    grpc_status = "INTERNAL"
    exit_code = 1
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (HSM workers); rebuild them whatever their __init__ takes.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[KmsError], message: str, state: dict[str, object]) -> KmsError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidArgument(KmsError):
    """Input that can never succeed as given; names the offending field."""

    grpc_status = "INVALID_ARGUMENT"
    exit_code = 2

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ConfigError(KmsError):
    """Configuration, policy or profile data that cannot be used."""

    grpc_status = "FAILED_PRECONDITION"
    exit_code = 3


class ProfileError(ConfigError):
    """A card profile that cannot be loaded: says which file, which line and why."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class NotFound(KmsError):
    grpc_status = "NOT_FOUND"
    exit_code = 4


class AlreadyExists(KmsError):
    grpc_status = "ALREADY_EXISTS"
    exit_code = 4


class PermissionDenied(KmsError):
    grpc_status = "PERMISSION_DENIED"
    exit_code = 5


class InvalidState(KmsError):
    """The object exists but its state forbids the operation (e.g. a master key that is not active)."""

    grpc_status = "FAILED_PRECONDITION"
    exit_code = 3


class HsmError(KmsError):
    """Something the HSM refused or could not do. ``retryable`` says whether the same call may succeed later."""

    grpc_status = "INTERNAL"
    exit_code = 6

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable

    @property
    def grpc_code(self) -> str:
        return "UNAVAILABLE" if self.retryable else self.grpc_status


class HsmLoginFailed(HsmError):
    """The PIN was refused or the token is locked. The PIN itself is never part of the message.

    Never retryable, by anyone: a real HSM locks its user PIN after a few failures, so neither a worker's
    replacement nor a client's retry may try the PIN again (FAILED_PRECONDITION: an operator must fix the PIN and
    restart the service)."""

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)

    @property
    def grpc_code(self) -> str:
        return self.grpc_status  # never UNAVAILABLE, whatever ``retryable`` says: clients retry only that


class HsmKeyNotFound(HsmError):
    grpc_status = "FAILED_PRECONDITION"


class MechanismUnavailable(HsmError):
    """The token does not offer a mechanism a recipe needs. kms never falls back to software."""

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, mechanism: str, token: str, what: str | None = None) -> None:
        prefix = f"{what}: " if what else ""
        suffix = f" (token {token!r})" if token else ""
        super().__init__(f"{prefix}mechanism not available on this HSM: {mechanism}{suffix}")
        self.mechanism = mechanism


class DeadlineExceeded(KmsError):
    """The call's deadline passed before the work could start; nothing was done."""

    grpc_status = "DEADLINE_EXCEEDED"
    exit_code = 8


class Cancelled(KmsError):
    """The caller went away; nothing more is done for the call."""

    grpc_status = "CANCELLED"
    exit_code = 130


class NotApproved(KmsError):
    """An officer did not approve a ceremony at the ``approve? [y/N]`` prompt, or there was no terminal to ask on
    (then the message says to pass ``--yes``). Its own exit status, apart from an interrupt's 130. Raised by the
    command line only."""

    grpc_status = "CANCELLED"
    exit_code = 14


class BundleRejected(KmsError):
    """A sealed bundle failed verification. Deliberately opaque: the reason is never told to the caller."""

    grpc_status = "PERMISSION_DENIED"
    exit_code = 7

    def __init__(self) -> None:
        super().__init__("bundle rejected")


class Unavailable(KmsError):
    """The service cannot do it now (e.g. its database is unreachable); the same call may succeed later."""

    grpc_status = "UNAVAILABLE"
    exit_code = 12
    retryable = True


class StorageUnavailable(Unavailable):
    """The service's database cannot be reached, read or written now (an I/O error, a full disk, locked past the
    busy timeout, a connection lost or refused; kms.store.storage_fault); ``reason`` says which in a few words, the
    database's own message goes to the server log only. Retryable: the same call may succeed once it is back."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the database is unavailable ({reason}); try again")
        self.reason = reason


class SecretUnavailable(Unavailable):
    """A secret kept in OpenBao (a ``vault:`` reference, kms.secrets) cannot be read now: OpenBao cannot be reached
    or is sealed, and this process holds no cached value that is still valid. The message names the reference or
    the setting and OpenBao's address, never a value. Retryable; its own exit code, so that it does not read as the
    service's database or the HSM."""

    exit_code = 15


class ResourceExhausted(KmsError):
    """A limit of the caller's (a station's or its bureau's cards per hour or day, streams in progress) is reached;
    the message names it. Not retryable as such: the same call succeeds only once the window has moved on or
    officers raised the limit (a set-limits ceremony)."""

    grpc_status = "RESOURCE_EXHAUSTED"
    exit_code = 11

    def __init__(self, message: str, *, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit


class AuditUnavailable(Unavailable):
    """The audit log cannot be written (its database is unreachable or refused the write): the change the record
    describes did not happen either (fail closed). Retryable, like any outage of the service's database; its own
    exit code, so that it does not read as the HSM's."""

    exit_code = 13

    def __init__(self, message: str = "the audit log cannot be written; nothing was done", *,
                 reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # the storage fault, in a few words, when one is known (e.g. "disk full")


class AuditSignedHeadMoved(Unavailable):
    """The audit signer's signed head is not the one the request's chain starts from: another checkpoint or seal
    was signed since the caller read it (another replica's, or a request of this replica that timed out and ran on
    in the signer). Nothing was signed or anchored; read the signed head again and retry (retryable)."""


class AuditChainBroken(KmsError):
    """The audit log no longer extends what the audit signer signed: it was changed outside kms. Nothing more is
    signed, so no export of the changed log can end with a good checkpoint."""

    grpc_status = "DATA_LOSS"
    exit_code = 10


class AuditNotVerified(KmsError):
    """An audit export that does not verify offline (kms.audit.verify): `kms audit verify` names the first bad
    record and exits with this code; `kms audit check-anchors` too when an export disagrees with the checkpoints
    anchored in OpenBao (kms.audit.anchor). Raised by no service: a log changed in the service's own database is
    AuditChainBroken."""

    grpc_status = "DATA_LOSS"
    exit_code = 9


def grpc_status_name(error: BaseException) -> str:
    """The gRPC status code name for any exception; unexpected ones become INTERNAL."""
    if isinstance(error, HsmError):
        return error.grpc_code
    if isinstance(error, KmsError):
        return error.grpc_status
    return "INTERNAL"


def exit_code(error: BaseException) -> int:
    """The CLI exit status for any exception; unexpected ones exit 1."""
    if isinstance(error, KmsError):
        return error.exit_code
    return 1


# -- gRPC status → kms error (clients) ------------------------------------------------------------------------------
# The other direction of ``grpc_status`` above, by status name as well, so that this module needs no grpc.


def _invalid(message: str) -> KmsError:
    """INVALID_ARGUMENT's details are "<field>: <reason>" (InvalidArgument); anything else names the request."""
    field, _, reason = message.partition(": ")
    return InvalidArgument(field, reason) if reason else InvalidArgument("request", message)


def _exhausted(message: str) -> KmsError:
    """A limit reached (kms.issuance.limits: "<scope> <subject>: limit <name> (<value>) reached; …"), or gRPC's own."""
    named = re.search(r": limit ([a-z_]+) \(", message)
    return ResourceExhausted(message, limit=named[1] if named else "")


_FROM_STATUS: dict[str, Callable[[str], KmsError]] = {
    "INVALID_ARGUMENT": _invalid,
    "PERMISSION_DENIED": PermissionDenied,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": InvalidState,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "RESOURCE_EXHAUSTED": _exhausted,
    "UNAVAILABLE": lambda message: Unavailable(f"service: unavailable: {message}"),
}


def from_status(name: str, message: str) -> KmsError:
    """The kms error a call's status stands for, from the status name (e.g. "NOT_FOUND") and its details:
    UNAVAILABLE is Unavailable (retryable, exit 12: the service or its database, the HSM's workers or the audit log
    cannot do it now; the same call may succeed later). Any other status becomes an HsmError
    "service: <status>: <details>" (INTERNAL, DATA_LOSS, ...)."""
    factory = _FROM_STATUS.get(name)
    if factory is not None:
        return factory(message)
    return HsmError(f"service: {name.lower()}: {message}")


# -- errors across the worker services' API (kms.server.worker, kms.server.remote) -----------------------------------

#: The attributes an error keeps when it crosses to another process by name (each a str, or ``retryable``).
CARRIED = ("field", "reason", "limit", "mechanism")


def error_class(kind: str) -> type[KmsError]:
    """The class of kms.errors called ``kind`` (KmsError for a name it does not define): errors that cross a process
    boundary by name are rebuilt only as classes of this tree, never looked up anywhere else."""
    found: type[KmsError] = KmsError
    todo: list[type[KmsError]] = [KmsError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == kind and cls.__module__ == __name__:
            found = cls
        todo.extend(cls.__subclasses__())
    return found


def rebuilt(kind: str, message: str, retryable: bool, attributes: dict[str, str]) -> KmsError:
    """The error another process raised (its class's name, message, retryability and CARRIED attributes)."""
    cls = error_class(kind)
    state: dict[str, object] = {"message": message, **{k: v for k, v in attributes.items() if k in CARRIED}}
    if retryable != cls.retryable:
        state["retryable"] = retryable
    error = _rebuild(cls, message, state)
    if isinstance(error, InvalidArgument) and not getattr(error, "field", ""):
        error.field, _, error.reason = message.partition(": ")
    return error
