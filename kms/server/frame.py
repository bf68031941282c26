"""The gRPC server frame: mutual TLS, identity from the verified client certificate, checked against the principal
registry (kms.principals: enrolled, active, certificate key pinned), one authorization interceptor
(kms/policies/authz.yaml, default deny), health checking and reflection, explicit message limits, and the one place
where kms errors become gRPC status codes.

Each handler reads its caller with ``current_principal()`` and the key domains the caller may act for with
``current_domains()``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kms import errors
from kms.audit.alarms import Alarms
from kms.audit.log import AuditLog, mask_pan
from kms.config import read_file
from kms.identity import Principal, from_certificate
from kms.principals import PrincipalRegistry, certificate_pin
from kms.server.authz import Policy

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a streamed message carries several bundles (~4 KiB each)
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("kms_principal")
_domains: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("kms_domains")
_recheck: contextvars.ContextVar[Callable[[], frozenset[str]]] = contextvars.ContextVar("kms_recheck")


def current_principal() -> Principal:
    """The verified caller of the request being handled."""
    return _principal.get()


def require_still_admitted(domains: Iterable[str]) -> None:
    """For long calls (a batch stream): the caller's certificate and registration are checked again, and the call
    goes on only while the caller may still act for every one of ``domains`` — a revocation (registry, CRL) during
    a stream ends it at the next message. PermissionDenied otherwise."""
    granted = _recheck.get()()
    missing = sorted(set(domains) - granted)
    if missing:
        raise errors.PermissionDenied(f"{current_principal()} may no longer act for the {' and '.join(missing)} "
                                      "domain")


def _reset(tokens: list[contextvars.Token[Any]]) -> None:
    _principal.reset(tokens[0])
    _domains.reset(tokens[1])
    _recheck.reset(tokens[2])


def current_domains() -> frozenset[str]:
    """The key domains the caller of the request being handled is registered for (kms.principals); a server
    without a principal registry (unit tests of the frame) treats every caller as registered for its own scope."""
    return _domains.get()


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error: kms.errors decides, unexpected errors are INTERNAL."""
    return grpc.StatusCode[errors.grpc_status_name(error)]


def abort(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the error's status. Unexpected errors say only 'see the server log'."""
    if isinstance(error, errors.KmsError):
        context.abort(status_code(error), str(error))
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    raise AssertionError("unreachable: grpc's context.abort raises")


Method = TypeVar("Method", bound=Callable[..., Any])
#: Set on every servicer method ``service_method`` wrapped (a test checks that every method of every service is).
SERVICE_METHOD = "__kms_service_method__"


def service_method(method: Method) -> Method:
    """The one way a servicer method's errors become its call's status: every method of every service is
    decorated with this. A kms error ends the call with the status kms.errors maps it to and its message; any other
    error is INTERNAL "see the server log" (logged with its traceback). A streaming method (a generator) ends the
    same way mid-stream, after the messages already sent."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as error:
                abort(context, error)
        wrapper: Callable[..., Any] = streaming
    else:
        @functools.wraps(method)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except Exception as error:
                abort(context, error)
        wrapper = unary
    setattr(wrapper, SERVICE_METHOD, True)
    return cast(Method, wrapper)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path

    def credentials(self) -> grpc.ServerCredentials:
        # A file that cannot be read is a ConfigError naming its setting and path (not an internal error).
        return grpc.ssl_server_credentials(
            [(read_file(self.key, "server.tls.key"), read_file(self.cert, "server.tls.cert"))],
            root_certificates=read_file(self.client_ca, "server.tls.ca"),
            require_client_auth=True,
        )


def _certificate_of(context: grpc.ServicerContext) -> x509.Certificate:
    certs = context.auth_context().get("x509_pem_cert") or []
    if len(certs) != 1:
        raise errors.PermissionDenied("no verified client certificate")
    return x509.load_pem_x509_certificate(certs[0])


#: A check of the verified client certificate before anything else (e.g. certificate revocation lists).
CertificateCheck = Callable[[x509.Certificate], None]


_PAN = re.compile(r"(?<![0-9A-Fa-f])\d{12,19}(?![0-9A-Fa-f])")
_CHIP_ID = re.compile(r"(?<![0-9A-Za-z])[0-9A-F]{16}(?:[0-9A-F]{4})?(?![0-9A-Za-z])")


def scrub(message: str) -> str:
    """A refusal's message as an audit record keeps it: PANs masked (6/4), card serials and KDDs (16 or 20 hex
    digits) reduced to their last 4 — refusal messages name the caller's own card data, records must not."""
    message = _PAN.sub(lambda m: mask_pan(m.group(0)), message)
    return _CHIP_ID.sub(lambda m: "*" * (len(m.group(0)) - 4) + m.group(0)[-4:], message)


MALFORMED = "request: cannot be parsed"
_UNPARSED = object()  # what a request that cannot be parsed deserializes to


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The request deserializer, except that bytes it cannot parse become _UNPARSED: grpcio would end such a call
    INTERNAL itself, before any handler (or the authorization check) ran."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or whatever else the bytes make the parser raise: the caller's
            return _UNPARSED
    return deserialize


def _parsed(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    """The handler, given parsed requests only: an unparsable one ends the call INVALID_ARGUMENT (recorded as
    ``request.malformed``), once the caller was authorized."""
    def refuse(context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)

    def checked(requests: Iterable[Any], context: grpc.ServicerContext) -> Iterable[Any]:
        for request in requests:
            if request is _UNPARSED:
                refuse(context)
            yield request

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        if streaming:
            return behavior(checked(request, context), context)
        if request is _UNPARSED:
            refuse(context)
        return behavior(request, context)
    return handler


class AuthorizationInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every call: who (from the certificate only), may they call this method (policy), then the handler.

    With an audit log, every call's outcome is recorded in a transaction of its own: ``request.refused`` (method,
    caller or "unauthenticated", gRPC status name, the error message) for a refusal by policy or a handler that ends
    with any status but OK (``request.malformed`` for a request that cannot be parsed), ``request.ok`` (method,
    caller) for a call that ends OK (a stream: when it ends). An OK outcome that cannot be recorded fails the call
    with UNAVAILABLE (fail closed); a refusal that cannot be recorded is still a refusal (and is logged)."""

    def __init__(self, policy: Policy, audit: AuditLog | None = None, principals: PrincipalRegistry | None = None,
                 certificate_checks: Iterable[CertificateCheck] = (), alarms: Alarms | None = None) -> None:
        self._policy = policy
        self._audit = audit
        self._principals = principals
        self._certificate_checks = tuple(certificate_checks)
        self._alarms = alarms

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        method = details.method
        policy = self._policy
        audit = self._audit
        principals = self._principals
        certificate_checks = self._certificate_checks
        alarms = self._alarms

        def refused(actor: str, domain: str, code: str, message: str) -> None:
            if alarms is not None:
                alarms.refused(actor, method, code)  # alarm.refusals: one caller refused often in a short time
            if audit is None:
                return
            try:
                audit.record("request.malformed" if message == MALFORMED else "request.refused", actor=actor,
                             domain=domain, subject=method, outcome="refused",
                             detail={"method": method, "status": code, "message": scrub(message)})
            except Exception:
                log.error("the refusal of %s to %s could not be recorded in the audit log", method, actor)

        def admitted(cert: x509.Certificate, principal: Principal) -> frozenset[str]:
            """The certificate checks and the registry: the domains the caller may act for now."""
            for check in certificate_checks:
                check(cert)
            if principals is not None:
                return principals.authenticate(principal, certificate_pin(cert)).domains
            return frozenset({principal.domain}) if principal.domain is not None else frozenset()

        def authorize(context: grpc.ServicerContext) -> tuple[Principal, list[contextvars.Token[Any]]]:
            principal: Principal | None = None
            try:
                cert = _certificate_of(context)
                principal = from_certificate(cert)  # who the refusal names, if a check below refuses
            except errors.KmsError as error:
                log.info("refused %s: %s", method, error)
                refused("unauthenticated", "", errors.grpc_status_name(error), str(error))
                abort(context, error)
            except Exception:  # a certificate the TLS layer verified but that cannot be read: refused, not INTERNAL
                log.exception("refused %s: unreadable client certificate", method)
                refused("unauthenticated", "", "PERMISSION_DENIED", "unreadable client certificate")
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "the client certificate cannot be read")
            assert principal is not None
            who = principal
            try:
                domains = admitted(cert, who)
                policy.check(who, method)
                if alarms is not None:
                    alarms.called(who, method)  # alarm.hours: a station calling outside the set hours
            except errors.KmsError as error:
                log.info("refused %s: %s", method, error)
                refused(who.uri(), who.domain or "", errors.grpc_status_name(error), str(error))
                abort(context, error)
            except Exception:  # e.g. the registry's database is unreachable: retryable, not the caller's fault
                log.exception("could not check the caller of %s", method)
                message = "the service cannot check the caller now; try again"
                refused(who.uri(), who.domain or "", "UNAVAILABLE", message)
                context.abort(grpc.StatusCode.UNAVAILABLE, message)

            def recheck() -> frozenset[str]:
                try:
                    return admitted(cert, who)
                except errors.KmsError:
                    raise
                except Exception:
                    log.exception("could not check the caller of %s again", method)
                    raise errors.Unavailable("the service cannot check the caller now; try again") from None

            return who, [_principal.set(who), _domains.set(domains), _recheck.set(recheck)]

        def ended(principal: Principal, context: grpc.ServicerContext, error: BaseException | None) -> None:
            """Record the outcome of a call whose handler has returned (error None) or raised ``error``."""
            if audit is None:
                return
            code = context.code()
            if error is None and code in (None, grpc.StatusCode.OK) and not context.is_active():
                error = GeneratorExit()  # the caller went away before the end (a handler may end quietly then)
            if error is None and code in (None, grpc.StatusCode.OK):
                try:
                    audit.record("request.ok", actor=principal.uri(), domain=principal.domain or "", subject=method,
                                 detail={"method": method})
                except Exception:
                    log.error("the outcome of %s by %s could not be recorded; the call fails", method, principal)
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the call's outcome could not be recorded in the audit "
                                  "log; what it changed is recorded, but its answer was not sent")
                return
            if code is not None and code != grpc.StatusCode.OK:
                text = context.details() or b""
                name, message = code.name, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            elif isinstance(error, GeneratorExit):
                name, message = "CANCELLED", "the caller cancelled the call"
            else:
                name, message = "UNKNOWN", f"the handler failed ({type(error).__name__})"
            refused(principal.uri(), principal.domain or "", name, message)

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:  # a request or a request iterator
                principal, tokens = authorize(context)
                try:
                    try:
                        response = behavior(request, context)
                    except BaseException as error:
                        ended(principal, context, error)
                        raise
                    ended(principal, context, None)
                    return response
                finally:
                    _reset(tokens)
            return wrapper

        def guard_stream(behavior: Callable[..., Iterable[Any]]) -> Callable[..., Iterable[Any]]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
                principal, tokens = authorize(context)
                try:
                    try:
                        yield from behavior(request, context)
                    except BaseException as error:
                        ended(principal, context, error)
                        raise
                    ended(principal, context, None)
                finally:
                    _reset(tokens)
            return wrapper

        if handler is None:  # no such method: the caller is still checked, and refused by the policy (no entry)
            return grpc.stream_stream_rpc_method_handler(guard_stream(lambda request, context: iter(())))
        deserializer = _tolerant(handler.request_deserializer)  # unparsable: INVALID_ARGUMENT, not grpcio's INTERNAL
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(guard(_parsed(handler.unary_unary, False)), deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(guard_stream(_parsed(handler.unary_stream, False)),
                                                        deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(guard(_parsed(handler.stream_unary, True)),
                                                        deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(guard_stream(_parsed(handler.stream_stream, True)),
                                                     deserializer, handler.response_serializer)


def create_server(
    tls: TlsFiles,
    policy: Policy,
    register: Callable[[grpc.Server], Iterable[str]] = lambda server: (),
    address: str = "127.0.0.1:0",
    max_workers: int = 16,
    audit: AuditLog | None = None,
    principals: PrincipalRegistry | None = None,
    certificate_checks: Iterable[CertificateCheck] = (),
    alarms: Alarms | None = None,
) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server and its port. ``register`` adds services and returns their full
    names (for reflection and health). With ``audit``, every call's outcome is recorded there; with ``principals``
    every caller must be enrolled, active and pinned there; ``certificate_checks`` run first on every call; with
    ``alarms`` refusals and stations' calling hours are watched (kms.audit.alarms)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[AuthorizationInterceptor(policy, audit, principals, certificate_checks, alarms)],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    names = list(register(server))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(address, tls.credentials())
    if port == 0:
        raise errors.ConfigError(f"cannot listen on {address}")
    return server, port
