"""The principal registry (kms.principals): every call is checked against enrolled, active, pinned principals.

The table test calls every method of every service (from the protobuf descriptors, so a new RPC is covered) as an
active, a revoked, a never-enrolled and a re-certified (same URI, new key, same CA) principal of each role, over the
real mTLS server: only the active, pinned principal gets past the registry, and every refusal is in the audit log.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from helpers import card, certificate_pem, client_config_for, officer_params, open_batch, run_ceremony, service_client

from kms import config
from kms.audit.log import AuditLog
from kms.client.audit import AuditClient
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.dev.ceremonies import client, officer
from kms.dev.home import Home
from kms.errors import InvalidArgument, NotFound, PermissionDenied
from kms.identity import Principal
from kms.principals import PrincipalRegistry
from kms.server.serve import Service
from kms.v1 import audit_pb2, cards_pb2, ceremony_pb2, issuance_pb2

REGISTRY_REFUSALS = ("is not enrolled in kms", "was revoked", "is not the one registered for it")
STATES = ("active", "revoked", "never-enrolled", "re-certified")


def _methods() -> list[tuple[str, bool]]:
    """Every RPC of every service the server offers: (full method name, server-streaming)."""
    found = []
    for module in (issuance_pb2, cards_pb2, ceremony_pb2, audit_pb2, health_pb2, reflection_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append((f"/{service.full_name}/{method.name}", method.server_streaming))
    return found


METHODS = _methods()


@dataclass(frozen=True)
class Caller:
    role: str
    state: str
    principal: Principal
    config: Path


@pytest.fixture(scope="module")
def callers(home: Home, service: Service) -> dict[tuple[str, str], Caller]:
    """Per role, an active, a revoked, a never-enrolled and a re-certified principal with client configurations."""
    tag = secrets.token_hex(3)
    made: dict[tuple[str, str], Caller] = {}
    port = service.port

    # officers: alice is active; a new officer is enrolled and revoked; one was never enrolled; alice re-certified
    alice = officer("hrss", 0)
    gone = Principal("officer", f"gone{tag}", domain="hrss")
    run_ceremony(home, port, "hrss", "enrol-officer", officer_params(home, gone))
    run_ceremony(home, port, "hrss", "revoke-officer", {"name": gone.name})
    stranger = Principal("officer", f"nobody{tag}", domain="hrss")
    made["officer", "active"] = Caller("officer", "active", alice, home.client_config(alice))
    made["officer", "revoked"] = Caller("officer", "revoked", gone, home.client_config(gone))
    made["officer", "never-enrolled"] = Caller("officer", "never-enrolled", stranger,
                                               client_config_for(home, stranger))
    made["officer", "re-certified"] = Caller("officer", "re-certified", alice, client_config_for(home, alice, tag))

    # stations: station-a1 is active; a new station is registered by both domains and revoked by both
    a1 = Principal("station", "station-a1", bureau="bureau-a")
    old = Principal("station", f"station-a{tag}", bureau="bureau-a")
    old_config = client_config_for(home, old)
    for domain in ("hrss", "bank"):
        run_ceremony(home, port, domain, "register-station",
                     {"bureau": "bureau-a", "station": old.name, "certificate": certificate_pem(home, old)})
        run_ceremony(home, port, domain, "revoke-station", {"bureau": "bureau-a", "station": old.name},
                     approvers=(1,))
    b9 = Principal("station", "station-b9", bureau="bureau-b")  # the station of the finding: never registered
    made["station", "active"] = Caller("station", "active", a1, client_config_for(home, a1))
    made["station", "revoked"] = Caller("station", "revoked", old, old_config)
    made["station", "never-enrolled"] = Caller("station", "never-enrolled", b9, client_config_for(home, b9))
    made["station", "re-certified"] = Caller("station", "re-certified", a1, client_config_for(home, a1, tag))

    # auditors: erin is active; a new auditor is enrolled by both domains and revoked by both
    erin = Principal("auditor", "erin")
    ivan = Principal("auditor", f"ivan{tag}")
    ivan_config = client_config_for(home, ivan)
    for domain in ("hrss", "bank"):
        run_ceremony(home, port, domain, "enrol-auditor",
                     {"name": ivan.name, "certificate": certificate_pem(home, ivan)})
        run_ceremony(home, port, domain, "revoke-auditor", {"name": ivan.name}, approvers=(1,))
    mallory = Principal("auditor", f"mallory{tag}")
    made["auditor", "active"] = Caller("auditor", "active", erin, home.client_config(erin))
    made["auditor", "revoked"] = Caller("auditor", "revoked", ivan, ivan_config)
    made["auditor", "never-enrolled"] = Caller("auditor", "never-enrolled", mallory, client_config_for(home, mallory))
    made["auditor", "re-certified"] = Caller("auditor", "re-certified", erin, client_config_for(home, erin, tag))
    return made


def _call(channel: grpc.Channel, method: str, streaming: bool) -> tuple[grpc.StatusCode, str]:
    """The method called with an empty request (valid for every proto3 message): its status and message."""
    try:
        if streaming:
            call = channel.unary_stream(method)(b"", timeout=5)
            for _ in call:
                break
            call.cancel()
            return grpc.StatusCode.OK, ""
        channel.unary_unary(method)(b"", timeout=20)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK, ""
        return error.code(), error.details() or ""


@pytest.fixture(scope="module")
def outcomes(home: Home, service: Service, callers: dict[tuple[str, str], Caller]
             ) -> dict[tuple[str, str, str], tuple[grpc.StatusCode, str]]:
    results = {}
    for (role, state), caller in callers.items():
        with Client(config.load_client(caller.config), server=f"localhost:{service.port}") as c:
            for method, streaming in METHODS:
                if method.endswith("/Watch") or method.endswith("/ServerReflectionInfo"):
                    continue  # stream-stream / endless: covered by Check and the policy test
                results[role, state, method] = _call(c.channel, method, streaming)
    return results


def test_every_method_refuses_every_principal_that_is_not_active_and_pinned(
        outcomes: dict[tuple[str, str, str], tuple[grpc.StatusCode, str]]) -> None:
    assert len(outcomes) >= 3 * 4 * 25
    wrong = []
    for (role, state, method), (code, message) in sorted(outcomes.items(), key=lambda i: i[0]):
        by_registry = code == grpc.StatusCode.PERMISSION_DENIED and any(r in message for r in REGISTRY_REFUSALS)
        if by_registry != (state != "active"):
            wrong.append(f"{role} {state} {method}: {code.name} {message}")
    assert not wrong, "\n".join(wrong)


def test_each_refusal_names_why(outcomes: dict[tuple[str, str, str], tuple[grpc.StatusCode, str]]) -> None:
    expected = {"revoked": "was revoked", "never-enrolled": "is not enrolled in kms",
                "re-certified": "is not the one registered for it"}
    for (_, state, method), (_, message) in outcomes.items():
        if state in expected:
            assert expected[state] in message, (state, method, message)


def test_every_refusal_is_in_the_audit_log(service: Service, callers: dict[tuple[str, str], Caller],
                                           outcomes: dict[tuple[str, str, str], tuple[grpc.StatusCode, str]]) -> None:
    audit = AuditLog(service.audit._engine, service.audit._clock)  # the service's own database
    refused: dict[tuple[str, str], list[str]] = {}
    for record in audit.records(kind="request.refused"):
        body = json.loads(record.body)
        refused.setdefault((body["actor"], body["subject"]), []).append(body["detail"]["message"])
    missing = []
    for (role, state, method), (_, message) in outcomes.items():
        if state == "active":
            continue
        uri = callers[role, state].principal.uri()
        if not any(message in m for m in refused.get((uri, method), [])):
            missing.append(f"{role} {state} {method}")
    assert not missing, missing


def test_a_station_acts_only_for_the_domains_that_registered_it(home: Home, service: Service) -> None:
    tag = secrets.token_hex(3)
    half = Principal("station", f"station-h{tag}", bureau="bureau-b")
    path = client_config_for(home, half)
    run_ceremony(home, service.port, "hrss", "register-station",
                 {"bureau": "bureau-b", "station": half.name, "certificate": certificate_pem(home, half)})
    batch = f"B-half-{tag}"
    with service_client(home, service, officer("hrss", 0)) as alice:
        open_batch(home, service.port, alice, batch, "bureau-b", "dual-app-v1",
                   [card(700000 + int(tag, 16) % 1000 * 10 + i, card_ref=f"half-{tag}-{i}") for i in range(2)])
    with Client(config.load_client(path), server=f"localhost:{service.port}") as station:
        with pytest.raises(PermissionDenied, match="not registered for the bank domain of batch"):
            list(station.stream_batch(batch))
        with pytest.raises(PermissionDenied, match="not registered for the bank domain"):
            CeremonyClient(station).fetch_transport_key("bank")
    # The bank registers it too: now it receives the batch.
    run_ceremony(home, service.port, "bank", "register-station",
                 {"bureau": "bureau-b", "station": half.name, "certificate": certificate_pem(home, half)})
    with Client(config.load_client(path), server=f"localhost:{service.port}") as station:
        received = list(station.stream_batch(batch))
    assert len(received) == 2


def test_a_renewed_certificate_replaces_the_old_one(home: Home, service: Service) -> None:
    tag = secrets.token_hex(3)
    who = Principal("officer", f"renew{tag}", domain="bank")
    run_ceremony(home, service.port, "bank", "enrol-officer", officer_params(home, who))
    new_config = client_config_for(home, who, "renewed")
    with Client(config.load_client(new_config), server=f"localhost:{service.port}") as c, \
            pytest.raises(PermissionDenied, match="not the one registered"):
        c.get_card("card-000001")
    run_ceremony(home, service.port, "bank", "renew-certificate",
                 {"name": who.name, "certificate": certificate_pem(home, who, "renewed")})
    with Client(config.load_client(new_config), server=f"localhost:{service.port}") as c:
        CeremonyClient(c).list()  # accepted
    with client(home, service.port, who) as old, pytest.raises(PermissionDenied, match="not the one registered"):
        CeremonyClient(old).list()


def test_registration_parameters_are_checked(home: Home, service: Service) -> None:
    alice_pem = certificate_pem(home, officer("hrss", 0))
    with client(home, service.port, officer("hrss", 0)) as c:
        cc = CeremonyClient(c)
        with pytest.raises(InvalidArgument, match=r"params\.certificate: names urn:kms:officer:hrss:alice, not "):
            cc.propose("register-station", {"bureau": "bureau-a", "station": "station-zz", "certificate": alice_pem})
        with pytest.raises(InvalidArgument, match=r"params\.certificate: is not a PEM X\.509 certificate"):
            cc.propose("enrol-auditor", {"name": "zed", "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n"})
        with pytest.raises(InvalidArgument, match=r"params\.cert_sha256: is not the certificate's key"):
            zed = certificate_pem(home, Principal("auditor", "zed"))
            cc.propose("enrol-auditor", {"name": "zed", "certificate": zed, "cert_sha256": "0" * 64})
        with pytest.raises(InvalidArgument, match=r"params\.station: .* is not registered for the hrss domain"):
            cc.propose("revoke-station", {"bureau": "bureau-a", "station": "station-never"})
        with pytest.raises(InvalidArgument, match=r"params\.station: .* \(register-station first\)"):
            cc.propose("register-transport-key", {"bureau": "bureau-a", "method": "rsa-oaep", "station": "station-zz",
                                                  "public_key": _rsa_pem()})


def _rsa_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_the_registry_unit(home: Home, service: Service) -> None:
    """Revocation by one domain leaves the other's registration; a pin is per domain."""
    registry = PrincipalRegistry(service.audit._engine, service.audit._clock)
    who = Principal("station", f"station-u{secrets.token_hex(3)}", bureau="bureau-a")
    with pytest.raises(PermissionDenied, match="not enrolled"):
        registry.authenticate(who, "a" * 64)
    registry.register(who, "hrss", "a" * 64, "C-test")
    registry.register(who, "bank", "b" * 64, "C-test")
    assert registry.authenticate(who, "a" * 64).domains == {"hrss"}
    assert registry.authenticate(who, "b" * 64).domains == {"bank"}
    registry.revoke(who, "hrss", "C-test2")
    with pytest.raises(PermissionDenied, match="not the one registered"):
        registry.authenticate(who, "a" * 64)
    registry.revoke(who, "bank", "C-test2")
    with pytest.raises(PermissionDenied, match="was revoked"):
        registry.authenticate(who, "b" * 64)


def test_an_auditor_reads_the_domains_that_enrolled_them(home: Home, service: Service) -> None:
    who = Principal("auditor", f"hana{secrets.token_hex(3)}")
    path = client_config_for(home, who)
    run_ceremony(home, service.port, "hrss", "enrol-auditor",
                 {"name": who.name, "certificate": certificate_pem(home, who)})
    with Client(config.load_client(path), server=f"localhost:{service.port}") as c:
        with pytest.raises(PermissionDenied, match="enrolled by the hrss domain only"):
            list(AuditClient(c).export())
        with pytest.raises(PermissionDenied, match="not enrolled by the bank domain"):
            list(AuditClient(c).export(domain="bank"))
        lines = [line for chunk in AuditClient(c).export(domain="hrss") for line in chunk]
    shown = [json.loads(line) for line in lines if line.startswith('{"type":"record"')]
    assert shown and {r["body"]["domain"] for r in shown} == {"hrss"}


def test_an_auditor_sees_only_the_ceremonies_batches_and_cards_of_the_domains_that_enrolled_them(
        home: Home, service: Service) -> None:
    """The review: an auditor revoked by the bank still read bank ceremonies and had the bank's HSM sign minutes."""
    who = Principal("auditor", f"omar{secrets.token_hex(3)}")
    path = client_config_for(home, who)
    run_ceremony(home, service.port, "hrss", "enrol-auditor",
                 {"name": who.name, "certificate": certificate_pem(home, who)})
    bank_ceremony = run_ceremony(home, service.port, "bank", "enrol-auditor",
                                 {"name": who.name, "certificate": certificate_pem(home, who)})
    run_ceremony(home, service.port, "bank", "revoke-auditor", {"name": who.name}, approvers=(1,))
    hrss_ceremony = run_ceremony(home, service.port, "hrss", "generate-master-key", {"name": f"aud{who.name[4:]}"})
    batch = f"B-aud-{secrets.token_hex(3)}"
    with service_client(home, service, officer("hrss", 0)) as alice:
        alice.create_batch(batch, "bureau-a", "dual-app-v1", [card(960_000, card_ref=f"aud-{batch}")])
    with Client(config.load_client(path), server=f"localhost:{service.port}") as c:
        cc = CeremonyClient(c)
        listed = {x.ceremony_id: x.domain for x in cc.list()}
        assert hrss_ceremony.ceremony_id in listed and set(listed.values()) == {"hrss"}
        assert cc.minutes(hrss_ceremony.ceremony_id).document
        with pytest.raises(NotFound):
            cc.minutes(bank_ceremony.ceremony_id)  # the bank's HSM signs nothing for them
        with pytest.raises(NotFound):
            cc.get(bank_ceremony.ceremony_id)
        with pytest.raises(PermissionDenied, match="not enrolled by the bank domain"):
            c.batch_status(batch)  # a dual-application batch
        with pytest.raises(PermissionDenied, match="not enrolled by the bank domain"):
            c.get_card(f"aud-{batch}")
    with client(home, service.port, Principal("auditor", "erin")) as erin:  # enrolled by both: sees both
        assert erin.batch_status(batch).batch_id == batch
        assert CeremonyClient(erin).minutes(bank_ceremony.ceremony_id).document


def test_a_station_revoked_during_its_stream_gets_no_further_message(home: Home, service: Service) -> None:
    """The review: a stream authorized once went on after revoke-station. Each message re-checks the caller."""
    tag = secrets.token_hex(3)
    station = Principal("station", f"station-r{tag}", bureau="bureau-b")
    path = client_config_for(home, station)
    for domain in ("hrss", "bank"):
        run_ceremony(home, service.port, domain, "register-station",
                     {"bureau": "bureau-b", "station": station.name, "certificate": certificate_pem(home, station)})
    batch = f"B-rev-{tag}"
    count = 400
    with service_client(home, service, officer("hrss", 0)) as alice:
        open_batch(home, service.port, alice, batch, "bureau-b", "dual-app-v1",
                   [card(970_000 + i, card_ref=f"rev-{tag}-{i}") for i in range(count)])
    received = 0
    with Client(config.load_client(path), server=f"localhost:{service.port}") as st:
        stream = st.stream_batch(batch, per_message=2, retries=0)
        next(stream)
        received = 1
        run_ceremony(home, service.port, "bank", "revoke-station", {"bureau": "bureau-b", "station": station.name},
                     approvers=(1,))
        with pytest.raises(PermissionDenied, match="may no longer act for the bank domain"):
            for _ in stream:
                received += 1
    assert received < count


def test_a_certificate_parameter_that_cannot_be_read_is_invalid_argument(home: Home, service: Service) -> None:
    """The review: a certificate whose subject alternative name cannot be parsed gave INTERNAL."""
    import datetime as dt

    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, "broken")])
    now = dt.datetime.now(dt.UTC)
    cert = (cx509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(cx509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x01\x02\x03"),
                           critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    with client(home, service.port, officer("hrss", 0)) as c, \
            pytest.raises(InvalidArgument, match=r"^params\.certificate: "):
        CeremonyClient(c).propose("enrol-auditor", {"name": "zora", "certificate": pem})
