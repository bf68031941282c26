"""The gRPC server frame: mutual TLS, identity from the verified client certificate, one authorization
interceptor (policies/authz.yaml, default deny), health checking and reflection, explicit message limits, and the
one place where kms errors become gRPC status codes.

Issue 3 adds the issuance services on this frame; each handler reads its caller with ``current_principal()``.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kms import errors
from kms.authz import Policy
from kms.identity import Principal, from_pem

log = logging.getLogger("kms.server")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a streamed message carries several bundles (~4 KiB each)
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("kms_principal")


def current_principal() -> Principal:
    """The verified caller of the request being handled."""
    return _principal.get()


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error: kms.errors decides, unexpected errors are INTERNAL."""
    return grpc.StatusCode[errors.grpc_status_name(error)]


def abort(context: grpc.ServicerContext, error: BaseException) -> None:
    """End the call with the error's status. Unexpected errors say only 'see the server log'."""
    if isinstance(error, errors.KmsError):
        context.abort(status_code(error), str(error))
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes(),
            require_client_auth=True,
        )


def _principal_of(context: grpc.ServicerContext) -> Principal:
    certs = context.auth_context().get("x509_pem_cert") or []
    if len(certs) != 1:
        raise errors.PermissionDenied("no verified client certificate")
    return from_pem(certs[0])


class AuthorizationInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every call: who (from the certificate only), may they call this method (policy), then the handler."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        policy = self._policy

        def authorize(context: grpc.ServicerContext) -> contextvars.Token[Principal]:
            try:
                principal = _principal_of(context)
                policy.check(principal, method)
            except errors.KmsError as error:
                log.info("refused %s: %s", method, error)
                abort(context, error)
            return _principal.set(principal)

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:  # a request or a request iterator
                token = authorize(context)
                try:
                    return behavior(request, context)
                finally:
                    _principal.reset(token)
            return wrapper

        def guard_stream(behavior: Callable[..., Iterable[Any]]) -> Callable[..., Iterable[Any]]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
                token = authorize(context)
                try:
                    yield from behavior(request, context)
                finally:
                    _principal.reset(token)
            return wrapper

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(guard_stream(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(guard_stream(handler.stream_stream),
                                                     handler.request_deserializer, handler.response_serializer)


def create_server(
    tls: TlsFiles,
    policy: Policy,
    register: Callable[[grpc.Server], Iterable[str]] = lambda server: (),
    address: str = "127.0.0.1:0",
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server and its port. ``register`` adds services and returns their full
    names (for reflection and health)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[AuthorizationInterceptor(policy)],
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
