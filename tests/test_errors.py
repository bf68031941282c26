"""kms.errors: gRPC status names and CLI exit codes per class, and back from a status to an error; every servicer
method turns errors into statuses the one way (kms.server.frame.service_method); errors survive pickling (HSM
workers)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pickle
import pkgutil
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import grpc
import pytest

import kms
from kms import errors
from kms.client import service as client
from kms.errors import (
    AlreadyExists,
    AuditChainBroken,
    AuditNotVerified,
    AuditSignedHeadMoved,
    AuditUnavailable,
    BundleRejected,
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    HsmError,
    HsmKeyNotFound,
    HsmLoginFailed,
    InvalidArgument,
    InvalidState,
    KmsError,
    MechanismUnavailable,
    NotApproved,
    NotFound,
    PermissionDenied,
    ProfileError,
    ResourceExhausted,
    SecretUnavailable,
    StorageUnavailable,
    Unavailable,
)
from kms.server import frame as server
from kms.server import worker
from kms.v1 import worker_pb2 as pb_worker

#: One instance of every KmsError class, built the way kms builds it.
EXAMPLES: dict[type[KmsError], Callable[[], KmsError]] = {
    KmsError: lambda: KmsError("something failed"),
    InvalidArgument: lambda: InvalidArgument("pan", "must be 12 to 19 digits"),
    ConfigError: lambda: ConfigError("/etc/kms.yaml: top level: unknown setting 'x'"),
    ProfileError: lambda: ProfileError("/etc/profiles/a.yaml", 12, "unknown recipe 'x'"),
    NotFound: lambda: NotFound("master key hrss-mk"),
    AlreadyExists: lambda: AlreadyExists("master key hrss-mk v1"),
    PermissionDenied: lambda: PermissionDenied("bureau-b may not open bureau-a bundles"),
    InvalidState: lambda: InvalidState("master key hrss-mk v1 is retired"),
    HsmError: lambda: HsmError("C_DeriveKey failed", retryable=True),
    HsmLoginFailed: lambda: HsmLoginFailed("login refused for token kms-hrss"),
    HsmKeyNotFound: lambda: HsmKeyNotFound("no key labelled kms/hrss/master/mk/1"),
    MechanismUnavailable: lambda: MechanismUnavailable("SM4_ECB_ENCRYPT_DATA", "kms-hrss"),
    BundleRejected: lambda: BundleRejected(),
    DeadlineExceeded: lambda: DeadlineExceeded("the deadline passed before any HSM work started"),
    Cancelled: lambda: Cancelled("the call was cancelled"),
    NotApproved: lambda: NotApproved("not approved"),
    AuditUnavailable: lambda: AuditUnavailable(),
    AuditSignedHeadMoved: lambda: AuditSignedHeadMoved("the audit signer's signed head is at 31, not 30"),
    AuditNotVerified: lambda: AuditNotVerified("audit log NOT verified: record 12 was edited"),
    AuditChainBroken: lambda: AuditChainBroken("the audit chain up to 30 does not extend the head signed at 30"),
    Unavailable: lambda: Unavailable("the service cannot check the caller now; try again"),
    StorageUnavailable: lambda: StorageUnavailable("disk I/O error"),
    SecretUnavailable: lambda: SecretUnavailable("secret reference vault:kv/kms/hrss#pin: OpenBao at "
                                                 "http://127.0.0.1:8200 is unavailable (connection refused)"),
    ResourceExhausted: lambda: ResourceExhausted("station urn:kms:station:bureau-a:station-a1: limit cards_per_hour "
                                                 "(100) reached; 100 issued in the last hour", limit="cards_per_hour"),
}

#: (gRPC status name, CLI exit code) per class.
MAPPING: dict[type[KmsError], tuple[str, int]] = {
    KmsError: ("INTERNAL", 1),
    InvalidArgument: ("INVALID_ARGUMENT", 2),
    ConfigError: ("FAILED_PRECONDITION", 3),
    ProfileError: ("FAILED_PRECONDITION", 3),
    NotFound: ("NOT_FOUND", 4),
    AlreadyExists: ("ALREADY_EXISTS", 4),
    PermissionDenied: ("PERMISSION_DENIED", 5),
    InvalidState: ("FAILED_PRECONDITION", 3),
    HsmError: ("INTERNAL", 6),
    HsmLoginFailed: ("FAILED_PRECONDITION", 6),
    HsmKeyNotFound: ("FAILED_PRECONDITION", 6),
    MechanismUnavailable: ("FAILED_PRECONDITION", 6),
    BundleRejected: ("PERMISSION_DENIED", 7),
    DeadlineExceeded: ("DEADLINE_EXCEEDED", 8),
    Cancelled: ("CANCELLED", 130),
    NotApproved: ("CANCELLED", 14),  # the command line only: an officer said no (or there was no terminal to ask)
    AuditUnavailable: ("UNAVAILABLE", 13),  # retryable: the database, not the HSM (no longer the HSM's 6)
    AuditNotVerified: ("DATA_LOSS", 9),  # `kms audit verify`
    AuditChainBroken: ("DATA_LOSS", 10),
    AuditSignedHeadMoved: ("UNAVAILABLE", 12),  # retryable: another checkpoint was signed first; nothing signed
    Unavailable: ("UNAVAILABLE", 12),  # retryable: the service, not the request
    StorageUnavailable: ("UNAVAILABLE", 12),  # the service's database: retryable like any outage of the service
    SecretUnavailable: ("UNAVAILABLE", 15),  # OpenBao down or sealed, no valid cached value: retryable
    ResourceExhausted: ("RESOURCE_EXHAUSTED", 11),  # not retryable: the client does not resume from it
}


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def _kms_modules() -> list[ModuleType]:
    """Every module of kms (subpackages too), imported, so that classes defined anywhere in kms are seen (not
    kms/migrations/env.py: Alembic's environment script, which runs only inside Alembic and defines no class)."""
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(kms.__path__, "kms.")
            if not m.name.endswith(".__main__") and m.name != "kms.migrations.env"]


def test_every_error_class_is_covered() -> None:
    _kms_modules()
    classes = {c for c in {KmsError, *_all_subclasses(KmsError)} if c.__module__.startswith("kms.")}
    assert classes == set(EXAMPLES) == set(MAPPING)


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_every_error_crosses_the_worker_api_as_itself(cls: type[KmsError]) -> None:
    error = EXAMPLES[cls]()
    back = worker.error_from(pb_worker.WorkerError.FromString(worker.error_message(error).SerializeToString()))
    assert type(back) is cls and str(back) == str(error) and back.retryable == error.retryable
    assert (errors.grpc_status_name(back), errors.exit_code(back)) == (errors.grpc_status_name(error),
                                                                       errors.exit_code(error))
    for name in errors.CARRIED:
        assert getattr(back, name, "") == getattr(error, name, "")


def test_a_worker_error_of_a_kind_the_tree_does_not_define_is_a_plain_kms_error() -> None:
    for kind in ("SystemExit", "ValueError", "KmsError", "kms.errors.HsmError", ""):
        back = worker.error_from(pb_worker.WorkerError(kind=kind, message="m", retryable=True))
        assert type(back) is KmsError and str(back) == "m" and back.retryable


@pytest.mark.parametrize("cls", list(MAPPING), ids=lambda c: c.__name__)
def test_status_and_exit_code(cls: type[KmsError]) -> None:
    status, code = MAPPING[cls]
    error = EXAMPLES[cls]()
    if isinstance(error, HsmError):
        error.retryable = False
    assert errors.grpc_status_name(error) == status
    assert errors.exit_code(error) == code


@pytest.mark.parametrize("cls", [HsmError, HsmKeyNotFound, MechanismUnavailable], ids=lambda c: c.__name__)
def test_retryable_hsm_error_is_unavailable(cls: type[HsmError]) -> None:
    error = EXAMPLES[cls]()
    error.retryable = True
    assert errors.grpc_status_name(error) == "UNAVAILABLE"
    assert errors.exit_code(error) == MAPPING[cls][1]  # the exit code does not change


def test_a_refused_pin_is_never_retryable() -> None:
    """A client retries UNAVAILABLE only; a PIN the token refused must not be tried again (issue 11, item 1)."""
    error = HsmLoginFailed("domains.bank.pin: the token kms-bank refused the PIN")
    assert error.retryable is False and errors.grpc_status_name(error) == "FAILED_PRECONDITION"
    error.retryable = True  # even so
    assert errors.grpc_status_name(error) == "FAILED_PRECONDITION"


def test_hsm_error_retryable_flag() -> None:
    assert HsmError("x").retryable is False
    assert HsmError("x", retryable=True).retryable is True
    assert HsmError("x", retryable=True).grpc_code == "UNAVAILABLE"
    assert HsmError("x").grpc_code == "INTERNAL"
    assert MechanismUnavailable("SM4", "t").retryable is False


def test_only_hsm_errors_and_unavailable_are_retryable() -> None:
    assert {c for c in EXAMPLES if EXAMPLES[c]().retryable and not issubclass(c, HsmError)} == {
        Unavailable, AuditUnavailable, StorageUnavailable, SecretUnavailable, AuditSignedHeadMoved}


def test_audit_unavailable_is_its_own_retryable_class() -> None:
    error = AuditUnavailable()
    assert not isinstance(error, HsmError)  # a database failure is not the HSM's
    assert isinstance(error, Unavailable) and error.retryable
    assert str(error) == "the audit log cannot be written; nothing was done"
    assert errors.exit_code(error) == 13 != errors.exit_code(HsmError("x", retryable=True))
    assert errors.grpc_status_name(error) == "UNAVAILABLE"


def test_storage_unavailable_names_the_fault_only() -> None:
    error = StorageUnavailable("disk full")
    assert isinstance(error, Unavailable) and error.retryable and error.reason == "disk full"
    assert str(error) == "the database is unavailable (disk full); try again"
    assert errors.grpc_status_name(error) == "UNAVAILABLE" and errors.exit_code(error) == 12


def test_exit_codes_are_shared_only_within_a_family() -> None:
    families = [{ConfigError, ProfileError, InvalidState}, {NotFound, AlreadyExists},
                {HsmError, HsmLoginFailed, HsmKeyNotFound, MechanismUnavailable},
                {Unavailable, StorageUnavailable, AuditSignedHeadMoved}]
    by_code: dict[int, set[type[KmsError]]] = {}
    for cls, (_, code) in MAPPING.items():
        by_code.setdefault(code, set()).add(cls)
    assert all(len(classes) == 1 or classes in families for classes in by_code.values()), by_code


def test_the_verifier_exit_code_is_the_declared_one() -> None:
    from kms.cli import audit as cli_audit

    assert cli_audit.NOT_VERIFIED == AuditNotVerified.exit_code == 9


# -- gRPC status → kms error (the clients) -------------------------------------------------------------------------


def test_status_names_are_grpc_status_codes() -> None:
    """Both directions name real gRPC status codes (kms.errors keeps them as text)."""
    names = {code.name for code in grpc.StatusCode}
    assert {cls.grpc_status for cls in MAPPING} <= names
    assert set(errors._FROM_STATUS) <= names


def test_errors_does_not_import_grpc() -> None:
    tree = ast.parse(inspect.getsource(errors))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] == "grpc"}


@pytest.mark.parametrize("cls", [InvalidArgument, NotFound, AlreadyExists, PermissionDenied, InvalidState,
                                 DeadlineExceeded, ResourceExhausted], ids=lambda c: c.__name__)
def test_a_status_comes_back_as_the_error_it_was(cls: type[KmsError]) -> None:
    error = EXAMPLES[cls]()
    back = errors.from_status(errors.grpc_status_name(error), str(error))
    assert type(back) is cls
    assert vars(back) == vars(error)  # field and reason, or the limit, survive the round trip


@pytest.mark.parametrize(("status", "cls"), [("FAILED_PRECONDITION", InvalidState),
                                             ("PERMISSION_DENIED", PermissionDenied)])
def test_statuses_shared_by_several_classes_come_back_as_one(status: str, cls: type[KmsError]) -> None:
    assert type(errors.from_status(status, "whatever")) is cls  # ConfigError, BundleRejected: told by the message


def test_invalid_argument_without_a_field_names_the_request() -> None:
    back = errors.from_status("INVALID_ARGUMENT", "request: cannot be parsed")
    assert isinstance(back, InvalidArgument) and (back.field, back.reason) == ("request", "cannot be parsed")
    odd = errors.from_status("INVALID_ARGUMENT", "no colon here")
    assert isinstance(odd, InvalidArgument) and (odd.field, odd.reason) == ("request", "no colon here")


def test_resource_exhausted_names_the_limit_or_none() -> None:
    theirs = errors.from_status("RESOURCE_EXHAUSTED", "Received message larger than max")
    assert isinstance(theirs, ResourceExhausted) and theirs.limit == ""


@pytest.mark.parametrize("status", ["INTERNAL", "DATA_LOSS", "UNKNOWN", "CANCELLED"])
def test_other_statuses_become_hsm_errors(status: str) -> None:
    back = errors.from_status(status, "the signer failed")
    assert type(back) is HsmError and not back.retryable
    assert str(back) == f"service: {status.lower()}: the signer failed"
    assert errors.grpc_status_name(back) == "INTERNAL" and errors.exit_code(back) == 6


@pytest.mark.parametrize("sent", [Unavailable("the registry's database cannot be read"), AuditUnavailable(),
                                  HsmError("the bank HSM worker could not start", retryable=True)],
                         ids=lambda e: type(e).__name__)
def test_unavailable_comes_back_as_unavailable_exit_12(sent: KmsError) -> None:
    """An outage of the service, its database, the audit log or an HSM's workers is one thing to a client: retry
    later. It exits 12 (Unavailable), not the HSM's 6: a client cannot tell which part was unavailable."""
    back = errors.from_status(errors.grpc_status_name(sent), str(sent))
    assert type(back) is Unavailable and back.retryable and errors.exit_code(back) == 12
    assert str(back) == f"service: unavailable: {sent}"


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def test_the_client_translates_through_errors() -> None:
    back = client.translate(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "cursor: is not a cursor this server gave"))
    assert isinstance(back, InvalidArgument) and back.field == "cursor"
    gone = client.translate(_RpcError(grpc.StatusCode.UNAVAILABLE, None))
    assert isinstance(gone, Unavailable) and gone.retryable and str(gone) == "service: unavailable: "


# -- kms error → status: one decorator on every servicer method --------------------------------------------------


def _servicer_bases() -> dict[str, type]:
    """The generated servicer base class of every kms.v1 service, by service name."""
    import kms.v1

    bases = {}
    for info in pkgutil.iter_modules(kms.v1.__path__, "kms.v1."):
        if info.name.endswith("_pb2"):
            messages = importlib.import_module(info.name)
            stubs = importlib.import_module(info.name + "_grpc")
            for name in messages.DESCRIPTOR.services_by_name:
                bases[name] = getattr(stubs, f"{name}Servicer")
    return bases


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


#: The internal services of the worker services (kms.server.worker): generic handlers whose every error ends the call
#: through that module's own abort (the kms error also in the trailing metadata), not servicer classes.
_INTERNAL = {"DomainWorker": worker.DomainWorker(None), "AuditSignerWorker": worker.AuditSignerWorker(None)}  # type: ignore[arg-type]


def test_every_servicer_method_of_every_service_goes_through_service_method() -> None:
    _kms_modules()
    services = _servicer_bases()
    assert set(services) == {"IssuanceService", "BatchService", "CardService", "CeremonyService", "AuditService",
                             *_INTERNAL}
    for name in _INTERNAL:  # the worker services' handlers: every method, each error through kms.server.worker
        handlers = _INTERNAL[name].handlers()._method_handlers  # type: ignore[attr-defined]
        methods = pb_worker.DESCRIPTOR.services_by_name[name].methods
        assert set(handlers) == {f"/kms.v1.{name}/{m.name}" for m in methods}
    for name, base in services.items():
        if name in _INTERNAL:
            continue
        implementations = {c for c in _subclasses(base) if c.__module__.startswith("kms.")}
        assert implementations, f"no implementation of {name} in kms"
        descriptor = importlib.import_module(base.__module__.removesuffix("_grpc")).DESCRIPTOR.services_by_name[name]
        for implementation in implementations:
            for method in descriptor.methods:
                function = getattr(implementation, method.name)
                assert function is not getattr(base, method.name), f"{implementation.__name__}.{method.name} missing"
                assert getattr(function, server.SERVICE_METHOD, False), \
                    f"{implementation.__name__}.{method.name} is not decorated with kms.server.frame.service_method"
                assert inspect.isgeneratorfunction(function) == method.server_streaming


class _Aborted(Exception):
    """What grpc's ServicerContext.abort raises."""


class _Context:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted()


class _Service:
    @server.service_method
    def Unary(self, request: Any, context: Any) -> str:
        if isinstance(request, BaseException):
            raise request
        return f"reply to {request}"

    @server.service_method
    def Stream(self, request: Any, context: Any) -> Iterator[str]:
        yield "first"
        yield "second"
        if isinstance(request, BaseException):
            raise request
        yield "third"


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_a_kms_error_ends_the_call_with_its_status_and_message(cls: type[KmsError]) -> None:
    error, context = EXAMPLES[cls](), _Context()
    with pytest.raises(_Aborted):
        _Service().Unary(error, context)
    assert context.status == (grpc.StatusCode[errors.grpc_status_name(error)], str(error))


def test_an_unexpected_error_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    context = _Context()
    with pytest.raises(_Aborted):
        _Service().Unary(KeyError("secret-looking detail"), context)
    assert context.status == (grpc.StatusCode.INTERNAL, "internal error; see the server log")
    assert any(r.exc_info and r.name == server.log.name for r in caplog.records)  # the traceback, in the log only


def test_a_reply_passes_unchanged() -> None:
    context = _Context()
    assert _Service().Unary("ping", context) == "reply to ping"
    assert context.status is None
    assert list(_Service().Stream("ping", context)) == ["first", "second", "third"]
    assert context.status is None


def test_a_stream_ends_with_the_status_after_the_messages_sent() -> None:
    context, received = _Context(), []
    with pytest.raises(_Aborted):
        for message in _Service().Stream(errors.Unavailable("the database is unreachable"), context):
            received.append(message)
    assert received == ["first", "second"]
    assert context.status == (grpc.StatusCode.UNAVAILABLE, "the database is unreachable")


def test_the_decorator_keeps_the_method_name() -> None:
    assert _Service.Unary.__name__ == "Unary" and _Service.Stream.__name__ == "Stream"
    assert inspect.isgeneratorfunction(_Service.Stream) and not inspect.isgeneratorfunction(_Service.Unary)


@pytest.mark.parametrize("error", [ValueError("x"), RuntimeError("x"), KeyboardInterrupt(), OSError(5, "EIO")],
                         ids=lambda e: type(e).__name__)
def test_unexpected_exceptions(error: BaseException) -> None:
    assert errors.grpc_status_name(error) == "INTERNAL"
    assert errors.exit_code(error) == 1


def test_messages() -> None:
    assert str(InvalidArgument("pan", "must be 12 to 19 digits")) == "pan: must be 12 to 19 digits"
    assert str(ProfileError("a.yaml", 7, "bad")) == "a.yaml:7: bad"
    assert str(BundleRejected()) == "bundle rejected"
    error = MechanismUnavailable("SM4_ECB_ENCRYPT_DATA", "kms-hrss")
    assert "SM4_ECB_ENCRYPT_DATA" in str(error)
    assert "kms-hrss" in str(error)
    assert error.mechanism == "SM4_ECB_ENCRYPT_DATA"


def test_hierarchy() -> None:
    assert issubclass(ProfileError, ConfigError)
    assert issubclass(MechanismUnavailable, HsmError)
    assert all(issubclass(c, KmsError) and issubclass(c, Exception) for c in EXAMPLES)


# -- pickling ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(cls: type[KmsError], protocol: int) -> None:
    error = EXAMPLES[cls]()
    copy = pickle.loads(pickle.dumps(error, protocol=protocol))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.message == error.message
    assert copy.args == error.args
    assert vars(copy) == vars(error)
    assert errors.grpc_status_name(copy) == errors.grpc_status_name(error)
    assert errors.exit_code(copy) == errors.exit_code(error)


def test_pickled_attributes() -> None:
    arg = pickle.loads(pickle.dumps(InvalidArgument("psn", "must be 2 digits")))
    assert (arg.field, arg.reason) == ("psn", "must be 2 digits")
    profile = pickle.loads(pickle.dumps(ProfileError("p.yaml", 3, "duplicate key 'a'")))
    assert (profile.path, profile.line, profile.reason) == ("p.yaml", 3, "duplicate key 'a'")
    mechanism = pickle.loads(pickle.dumps(MechanismUnavailable("SM4_ECB_ENCRYPT_DATA", "kms-bank")))
    assert mechanism.mechanism == "SM4_ECB_ENCRYPT_DATA"
    hsm = pickle.loads(pickle.dumps(HsmError("busy", retryable=True)))
    assert hsm.retryable is True
    assert errors.grpc_status_name(hsm) == "UNAVAILABLE"


def test_pickle_keeps_attributes_set_later() -> None:
    error = ConfigError("x")
    error.add_note("while loading profiles")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.__notes__ == ["while loading profiles"]


def test_pickled_error_can_be_raised() -> None:
    copy = pickle.loads(pickle.dumps(BundleRejected()))
    with pytest.raises(BundleRejected, match=r"^bundle rejected$"):
        raise copy
