"""kms.errors: gRPC status names and CLI exit codes per class; errors survive pickling (HSM worker processes)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
from collections.abc import Callable

import pytest

import kms
from kms import errors
from kms.audit.log import AuditUnavailable
from kms.errors import (
    AlreadyExists,
    AuditChainBroken,
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
    NotFound,
    PermissionDenied,
    ProfileError,
    ResourceExhausted,
    Unavailable,
)

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
    AuditUnavailable: lambda: AuditUnavailable(),
    AuditChainBroken: lambda: AuditChainBroken("the audit chain up to 30 does not extend the head signed at 30"),
    Unavailable: lambda: Unavailable("the service cannot check the caller now; try again"),
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
    HsmLoginFailed: ("INTERNAL", 6),
    HsmKeyNotFound: ("FAILED_PRECONDITION", 6),
    MechanismUnavailable: ("FAILED_PRECONDITION", 6),
    BundleRejected: ("PERMISSION_DENIED", 7),
    DeadlineExceeded: ("DEADLINE_EXCEEDED", 8),
    Cancelled: ("CANCELLED", 130),
    AuditUnavailable: ("INTERNAL", 6),  # retryable as raised: UNAVAILABLE
    AuditChainBroken: ("DATA_LOSS", 10),
    Unavailable: ("UNAVAILABLE", 12),  # retryable: the service, not the request
    ResourceExhausted: ("RESOURCE_EXHAUSTED", 11),  # not retryable: the client does not resume from it
}


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def test_every_error_class_is_covered() -> None:
    for module in pkgutil.walk_packages(kms.__path__, "kms."):
        if not module.name.endswith(".__main__"):  # importing kms.cli.__main__ would run the command line
            importlib.import_module(module.name)  # so that subclasses defined anywhere in kms are seen
    classes = {c for c in {KmsError, *_all_subclasses(KmsError)} if c.__module__.startswith("kms.")}
    assert classes == set(EXAMPLES) == set(MAPPING)


@pytest.mark.parametrize("cls", list(MAPPING), ids=lambda c: c.__name__)
def test_status_and_exit_code(cls: type[KmsError]) -> None:
    status, code = MAPPING[cls]
    error = EXAMPLES[cls]()
    if isinstance(error, HsmError):
        error.retryable = False
    assert errors.grpc_status_name(error) == status
    assert errors.exit_code(error) == code


@pytest.mark.parametrize("cls", [HsmError, HsmLoginFailed, HsmKeyNotFound, MechanismUnavailable, AuditUnavailable],
                         ids=lambda c: c.__name__)
def test_retryable_hsm_error_is_unavailable(cls: type[HsmError]) -> None:
    error = EXAMPLES[cls]()
    error.retryable = True
    assert errors.grpc_status_name(error) == "UNAVAILABLE"
    assert errors.exit_code(error) == MAPPING[cls][1]  # the exit code does not change


def test_hsm_error_retryable_flag() -> None:
    assert HsmError("x").retryable is False
    assert HsmError("x", retryable=True).retryable is True
    assert HsmError("x", retryable=True).grpc_code == "UNAVAILABLE"
    assert HsmError("x").grpc_code == "INTERNAL"
    assert MechanismUnavailable("SM4", "t").retryable is False


def test_only_hsm_errors_and_unavailable_are_retryable() -> None:
    assert {c for c in EXAMPLES if EXAMPLES[c]().retryable and not issubclass(c, HsmError)} == {Unavailable}


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
