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
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kms import errors, logs, metrics
from kms.audit.alarms import Alarms
from kms.audit.log import AuditLog, mask_pan
from kms.config import Capacity, read_file
from kms.identity import Principal, from_certificate
from kms.principals import PrincipalRegistry, certificate_pin
from kms.server.authz import Policy
from kms.server.capacity import StreamSlots
from kms.store import storage_fault

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
    """End the call with the error's status. Unexpected errors say only 'see the server log'. The error's class (and
    an unexpected error's traceback) go to the request's log context: the interceptor logs the outcome once."""
    logs.note(error=type(error).__name__)
    if isinstance(error, errors.KmsError):
        context.abort(status_code(error), str(error))
    fault = _storage_fault(error)
    if fault is not None:  # a database error from an engine kms.store.make_engine did not make: still an outage
        log.warning("storage fault: %s", fault)
        context.abort(grpc.StatusCode.UNAVAILABLE, str(errors.StorageUnavailable(fault)))
    if logs.context():
        logs.note(_exc=error)
    else:  # no interceptor around this call (unit tests of a servicer): the traceback is logged here
        log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    raise AssertionError("unreachable: grpc's context.abort raises")


def _storage_fault(error: BaseException) -> str | None:
    """The storage fault (kms.store.storage_fault) an unexpected error is, or was raised from (``raise ... from
    fault``, or ``from None`` over one: a deliberate translation). An error raised *while handling* a fault (an
    implicit context: a bug in an ``except`` block) is not one: it stays INTERNAL, with its traceback logged."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        fault = storage_fault(current)
        if fault is not None:
            return fault
        current = current.__cause__ or (current.__context__ if current.__suppress_context__ else None)
    return None


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
    #: The private key's file, or its PEM already in memory (a key kept in OpenBao: TlsConfig.private_key).
    key: Path | bytes = field(repr=False)
    client_ca: Path

    def credentials(self) -> grpc.ServerCredentials:
        # A file that cannot be read is a ConfigError naming its setting and path (not an internal error).
        key = self.key if isinstance(self.key, bytes) else read_file(self.key, "server.tls.key")
        return grpc.ssl_server_credentials(
            [(key, read_file(self.cert, "server.tls.cert"))],
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
REQUEST_ID = "x-request-id"  # trailing metadata: the id the server's log lines of the call carry
#: Status codes that say the caller was refused (logged at INFO); UNAVAILABLE is logged at WARNING, the rest at ERROR.
_CALLER_CODES = frozenset({"INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND", "ALREADY_EXISTS",
                           "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED",
                           "OUT_OF_RANGE", "ABORTED"})


def _outcome_level(code: str, error: str) -> int:
    if error.startswith("Hsm") or error == "MechanismUnavailable" or code == "UNAVAILABLE":
        return logging.WARNING  # an HSM failure, or a fault the caller may retry through
    return logging.INFO if code in _CALLER_CODES else logging.ERROR


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
    with UNAVAILABLE (fail closed); a refusal that cannot be recorded is still a refusal (and is logged).

    Every call gets a request id (trailing metadata ``x-request-id``), which every log line of the call carries with
    the caller and the method (kms.logs); every outcome but OK is logged once, and counted (kms.metrics:
    kms_requests_total, kms_refusals_total, kms_streams_open)."""

    def __init__(self, policy: Policy, audit: AuditLog | None = None, principals: PrincipalRegistry | None = None,
                 certificate_checks: Iterable[CertificateCheck] = (), alarms: Alarms | None = None,
                 draining: threading.Event | None = None, streams: StreamSlots | None = None) -> None:
        self._draining = draining
        self._policy = policy
        self._audit = audit
        self._principals = principals
        self._certificate_checks = tuple(certificate_checks)
        self._alarms = alarms
        self._streams = streams  # a stream holds a slot while it runs (kms.server.capacity)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        method = details.method
        policy = self._policy
        audit = self._audit
        principals = self._principals
        certificate_checks = self._certificate_checks
        alarms = self._alarms
        draining = self._draining
        label = method if handler is not None else metrics.UNKNOWN_METHOD  # no caller-chosen label values
        streaming = handler is None or bool(handler.unary_stream or handler.stream_stream)
        streams = self._streams

        def refused(actor: str, domain: str, code: str, message: str, stage: str = "handler") -> None:
            """A call that does not end OK: counted, logged once (with its request context), alarms, audited."""
            metrics.REQUESTS.labels(label, code).inc()
            metrics.REFUSALS.labels(label, code, stage).inc()
            noted = logs.context()
            error = str(noted.get("error", ""))
            event = "refused" if stage == "admission" else "aborted" if streaming else "failed"
            text = scrub(message)
            what = {"refused": f"refused {method}", "aborted": f"stream {method} aborted",
                    "failed": f"{method} failed"}[event]
            exc = noted.get("_exc")
            log.log(_outcome_level(code, error), "%s: %s: %s", what, code, text,
                    extra={"code": code, "event": event},
                    exc_info=(type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None)
            if alarms is not None:
                alarms.refused(actor, method, code)  # alarm.refusals: one caller refused often in a short time
            if audit is None:
                return
            try:
                audit.record("request.malformed" if message == MALFORMED else "request.refused", actor=actor,
                             domain=domain, subject=method, outcome="refused",
                             detail={"method": method, "status": code, "message": text})
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
                logs.note(error=type(error).__name__)
                refused("unauthenticated", "", errors.grpc_status_name(error), str(error), "admission")
                abort(context, error)
            except Exception as error:  # a certificate the TLS layer verified but that cannot be read: refused
                logs.note(error=type(error).__name__, _exc=error)
                refused("unauthenticated", "", "PERMISSION_DENIED", "unreadable client certificate", "admission")
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "the client certificate cannot be read")
            assert principal is not None
            who = principal
            logs.note(principal=who.uri(), domain=who.domain)
            try:
                domains = admitted(cert, who)
                policy.check(who, method)
                if alarms is not None:
                    alarms.called(who, method)  # alarm.hours: a station calling outside the set hours
            except errors.KmsError as error:
                logs.note(error=type(error).__name__)
                refused(who.uri(), who.domain or "", errors.grpc_status_name(error), str(error), "admission")
                abort(context, error)
            except Exception as error:  # e.g. the registry's database is unreachable: retryable, not the caller's
                logs.note(error=type(error).__name__, _exc=error)
                message = "the service cannot check the caller now; try again"
                refused(who.uri(), who.domain or "", "UNAVAILABLE", message, "admission")
                context.abort(grpc.StatusCode.UNAVAILABLE, message)

            def recheck() -> frozenset[str]:
                try:
                    return admitted(cert, who)
                except errors.KmsError:
                    raise
                except Exception as error:  # logged with the call's outcome (UNAVAILABLE), with this traceback
                    logs.note(_exc=error)
                    raise errors.Unavailable("the service cannot check the caller now; try again") from None

            return who, [_principal.set(who), _domains.set(domains), _recheck.set(recheck)]

        def ended(principal: Principal, context: grpc.ServicerContext, error: BaseException | None,
                  started: float) -> None:
            """Record the outcome of a call whose handler has returned (error None) or raised ``error``."""
            code = context.code()
            if error is None and code in (None, grpc.StatusCode.OK) and not context.is_active():
                error = GeneratorExit()  # the caller went away before the end (a handler may end quietly then)
            if error is None and code in (None, grpc.StatusCode.OK):
                try:
                    if audit is not None:
                        audit.record("request.ok", actor=principal.uri(), domain=principal.domain or "",
                                     subject=method, detail={"method": method})
                except Exception as failure:
                    metrics.REQUESTS.labels(label, "UNAVAILABLE").inc()
                    log.error("the outcome of %s by %s could not be recorded; the call fails", method, principal)
                    reason = getattr(failure, "reason", "")  # the storage fault, e.g. "disk full"
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the call's outcome could not be recorded in the audit "
                                  f"log{f' ({reason})' if reason else ''}; what it changed is recorded, but its "
                                  "answer was not sent")
                metrics.REQUESTS.labels(label, "OK").inc()
                log.debug("%s ok in %.3f s", method, time.monotonic() - started)
                return
            if code is not None and code != grpc.StatusCode.OK:
                text = context.details() or b""
                name, message = code.name, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            elif isinstance(error, GeneratorExit):
                name, message = "CANCELLED", "the caller cancelled the call"
            else:
                name, message = "UNKNOWN", f"the handler failed ({type(error).__name__})"
            refused(principal.uri(), principal.domain or "", name, message)

        def begin(context: grpc.ServicerContext) -> contextvars.Token[Any]:
            """The call's request id: in its log context, and sent back in the trailing metadata."""
            request_id = secrets.token_hex(8)
            bound = logs.bind(request_id=request_id, method=method)
            context.set_trailing_metadata(((REQUEST_ID, request_id),))
            return bound

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:  # a request or a request iterator
                started, bound = time.monotonic(), begin(context)
                try:
                    principal, tokens = authorize(context)
                    slot = False
                    try:
                        slot = take_slot(principal, context, stream=False)
                        try:
                            response = behavior(request, context)
                        except BaseException as error:
                            ended(principal, context, error, started)
                            raise
                        ended(principal, context, None, started)
                        return response
                    finally:
                        if slot:
                            assert streams is not None
                            streams.release_call(principal.uri())
                        _reset(tokens)
                finally:
                    logs.unbind(bound)
            return wrapper

        def take_slot(principal: Principal, context: grpc.ServicerContext, stream: bool) -> bool:
            """One of the caller's stream or unary call slots (kms.server.capacity), or the call refused
            RESOURCE_EXHAUSTED naming the limit. False when the server counts no slots."""
            if streams is None:
                return False
            try:
                (streams.take if stream else streams.take_call)(principal.uri())
            except errors.ResourceExhausted as error:
                refused(principal.uri(), principal.domain or "", error.grpc_status, str(error), "admission")
                abort(context, error)
            return True

        def guard_stream(behavior: Callable[..., Iterable[Any]]) -> Callable[..., Iterable[Any]]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
                started, bound = time.monotonic(), begin(context)
                try:
                    principal, tokens = authorize(context)
                    slot = False
                    try:
                        slot = take_slot(principal, context, stream=True)
                        gauge = metrics.STREAMS_OPEN.labels(label)
                        gauge.inc()
                        try:
                            try:
                                yield from _until_draining(behavior(request, context), context, draining)
                            except BaseException as error:
                                ended(principal, context, error, started)
                                raise
                            ended(principal, context, None, started)
                        finally:
                            gauge.dec()
                    finally:
                        if slot:
                            assert streams is not None
                            streams.release(principal.uri())
                        _reset(tokens)
                finally:
                    logs.unbind(bound)
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


#: The status and message a stream ends with when the service stops (SIGTERM) after its current message.
DRAINING = "the service is stopping; resume from the last cursor (on another replica, or once it is back)"


def _until_draining(messages: Iterable[Any], context: grpc.ServicerContext,
                    draining: threading.Event | None) -> Iterator[Any]:
    """A stream's messages, until the service drains: the message in flight is finished and sent, then the stream
    ends UNAVAILABLE (retryable; the client resumes from that message's cursor) instead of being cut mid-message
    when the grace period runs out."""
    iterator = iter(messages)
    try:
        for message in iterator:
            yield message
            if draining is not None and draining.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _bind_error(address: str) -> str:
    """Why ``address`` cannot be listened on, as the OS says it (e.g. "address already in use"), or "" if it can
    (gRPC itself reports only that binding failed)."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, ValueError):
        return "cannot resolve the address"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                probe.bind(sockaddr)
            except OSError as error:
                return (error.strerror or str(error)).lower()
    return ""


def create_server(
    tls: TlsFiles,
    policy: Policy,
    register: Callable[[grpc.Server], Iterable[str]] = lambda server: (),
    address: str = "127.0.0.1:0",
    audit: AuditLog | None = None,
    principals: PrincipalRegistry | None = None,
    certificate_checks: Iterable[CertificateCheck] = (),
    alarms: Alarms | None = None,
    health_servicer: health.HealthServicer | None = None,
    draining: threading.Event | None = None,
    capacity: Capacity | None = None,
    streams: StreamSlots | None = None,
) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server and its port, bound already (a port in use is a ConfigError
    "server.listen <address>: address already in use": the port is never shared, ``grpc.so_reuseport`` is off).
    ``register`` adds services and returns their full names (for reflection and health). With ``audit``, every
    call's outcome is recorded there; with ``principals`` every caller must be enrolled, active and pinned there;
    ``certificate_checks`` run first on every call; with ``alarms`` refusals and stations' calling hours are
    watched (kms.audit.alarms). ``health_servicer``: the health statuses someone else keeps (kms.server.health);
    without one every service says SERVING. ``draining``: once set, streams end after their current message.
    ``capacity`` (kms.yaml's ``server`` settings; the defaults of kms.config.Capacity without it) sizes the thread
    pool, gRPC's limit of calls in progress and the stream slots, counted in ``streams`` (one made here if none is
    given; kms.server.capacity)."""
    capacity = capacity or Capacity()
    streams = streams or StreamSlots(capacity)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=capacity.threads, thread_name_prefix="kms-rpc"),
        interceptors=[AuthorizationInterceptor(policy, audit, principals, certificate_checks, alarms,
                                               draining=draining, streams=streams)],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],  # a second server on this port fails instead of sharing it
        maximum_concurrent_rpcs=capacity.max_concurrent_rpcs,
    )
    names = list(register(server))
    if health_servicer is None:
        health_servicer = health.HealthServicer()
        for name in ("", *names):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    if not address.endswith(":0"):
        busy = _bind_error(address)  # asked first: gRPC's own failure also writes a line of its own to stderr
        if busy:
            raise errors.ConfigError(f"server.listen {address}: {busy}")
    try:
        port = server.add_secure_port(address, tls.credentials())
    except RuntimeError:  # grpcio raises when it cannot bind; older versions return 0
        port = 0
    if port == 0:
        raise errors.ConfigError(f"server.listen {address}: {_bind_error(address) or 'cannot listen there'}")
    return server, port
