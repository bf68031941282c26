"""The gRPC frame over real mutual TLS on 127.0.0.1: identity from the certificate, policy, health, reflection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kms import store
from kms.audit.log import AuditLog
from kms.clock import SystemClock
from kms.dev.pki import Credential, DevPki
from kms.identity import Principal
from kms.principals import PrincipalRegistry
from kms.server.authz import Policy
from kms.server.frame import MALFORMED, TlsFiles, create_server

STATION = Principal("station", "station-a1", bureau="bureau-a")
AUDITOR = Principal("auditor", "carol")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return DevPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def port(pki: DevPki) -> Iterator[int]:
    cred = pki.server()
    server, port = create_server(TlsFiles(cred.cert, cred.key, pki.ca.cert), Policy.load())
    server.start()
    yield port
    server.stop(grace=None)


def _channel(pki: DevPki, port: int, cred: Credential | None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=cred.key.read_bytes() if cred else None,
        certificate_chain=cred.cert.read_bytes() if cred else None,
    )
    return grpc.secure_channel(f"localhost:{port}", creds)


def test_health_answers_an_authenticated_station(pki: DevPki, port: int) -> None:
    with _channel(pki, port, pki.client(STATION)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_without_a_certificate_cannot_connect(pki: DevPki, port: int) -> None:
    with _channel(pki, port, None) as channel, pytest.raises(grpc.RpcError) as raised:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(pki: DevPki, port: int, tmp_path: Path) -> None:
    rogue = DevPki(tmp_path / "rogue").client(STATION)
    with _channel(pki, port, rogue) as channel, pytest.raises(grpc.RpcError) as raised:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_policy_decides_by_the_role_in_the_certificate(pki: DevPki, port: int) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with _channel(pki, port, pki.client(STATION)) as channel, pytest.raises(grpc.RpcError) as raised:
        list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=10))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with _channel(pki, port, pki.client(AUDITOR)) as channel:
        replies = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([request]), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "grpc.health.v1.Health" in names


# -- requests that cannot be parsed --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, AuditLog]]:
    """A server that records every call's outcome (kms.audit.log) in a database of its own."""
    engine = store.make_engine(f"sqlite:///{tmp_path_factory.mktemp('audited') / 'kms.db'}")
    store.upgrade(engine)
    audit = AuditLog(engine, SystemClock())
    cred = pki.server()
    server, port = create_server(TlsFiles(cred.cert, cred.key, pki.ca.cert), Policy.load(), audit=audit)
    server.start()
    yield port, audit
    server.stop(grace=None)


def test_a_request_that_cannot_be_parsed_is_refused_invalid_argument_and_recorded(
        pki: DevPki, audited: tuple[int, AuditLog]) -> None:
    port, audit = audited
    garbage = [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0b" * 200]  # corrupt, not UTF-8, groups nested too deep
    with _channel(pki, port, pki.client(STATION)) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")  # raw bytes: no serializer
        for data in garbage:
            with pytest.raises(grpc.RpcError) as raised:
                check(data, timeout=10)
            # grpcio alone answers INTERNAL "Exception deserializing request!" before any handler runs.
            assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        # A stream of requests: the one that cannot be parsed ends the call the same way.
        info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with _channel(pki, port, pki.client(AUDITOR)) as auditor_channel, pytest.raises(grpc.RpcError) as raised:
            list(auditor_channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                iter([reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(), b"\xff\xff"]),
                timeout=10))
        assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        # Policy still comes first: a station may not call reflection, parsable request or not.
        with pytest.raises(grpc.RpcError) as raised:
            list(info(iter([b"\xff\xff"]), timeout=10))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    records = [json.loads(r.body) for r in audit.records()]
    malformed = [r for r in records if r["kind"] == "request.malformed"]
    assert [(r["subject"], r["actor"], r["detail"]["status"]) for r in malformed] == [
        ("/grpc.health.v1.Health/Check", STATION.uri(), "INVALID_ARGUMENT")] * 3 + [
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", AUDITOR.uri(), "INVALID_ARGUMENT")]
    assert [r["detail"]["status"] for r in records if r["kind"] == "request.refused"] == ["PERMISSION_DENIED"]


def test_a_registry_that_cannot_be_read_is_unavailable_not_a_bad_certificate(pki: DevPki, tmp_path: Path) -> None:
    """The review: a database outage while checking the caller read as "the client certificate cannot be read"
    (PERMISSION_DENIED, final). It is UNAVAILABLE (retryable), and the refusal names the caller."""
    gone = sa.create_engine("postgresql+psycopg://kms:kms@127.0.0.1:1/nowhere", connect_args={"connect_timeout": 2})
    records = store.make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    store.upgrade(records)
    audit = AuditLog(records, SystemClock())
    cred = pki.server()
    server, port = create_server(TlsFiles(cred.cert, cred.key, pki.ca.cert), Policy.load(), audit=audit,
                                 principals=PrincipalRegistry(gone, SystemClock()))
    server.start()
    try:
        with _channel(pki, port, pki.client(STATION)) as channel, pytest.raises(grpc.RpcError) as raised:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
    finally:
        server.stop(grace=None)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot check the caller now" in (raised.value.details() or "")
    refusal = json.loads(list(audit.records(kind="request.refused"))[-1].body)
    assert (refusal["actor"], refusal["detail"]["status"]) == (STATION.uri(), "UNAVAILABLE")


def test_an_unknown_method_is_refused_by_policy_and_recorded(pki: DevPki, audited: tuple[int, AuditLog]) -> None:
    """The review: a method the server does not have was answered UNIMPLEMENTED before any check, unrecorded."""
    port, audit = audited
    with _channel(pki, port, pki.client(STATION)) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary("/kms.v1.IssuanceService/NoSuchMethod")(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is not open to anyone (no policy entry)" in (raised.value.details() or "")
    refusal = json.loads(list(audit.records(kind="request.refused"))[-1].body)
    assert (refusal["actor"], refusal["subject"]) == (STATION.uri(), "/kms.v1.IssuanceService/NoSuchMethod")
