"""The gRPC frame over real mutual TLS on 127.0.0.1: identity from the certificate, policy, health, reflection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kms.authz import Policy
from kms.identity import Principal
from kms.pki import Credential, DevPki
from kms.server import TlsFiles, create_server

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
