"""Certificate revocation lists (kms.revocation): the server refuses a revoked client certificate on its next call
once the CRL file changes, without a restart; the client refuses a revoked server certificate.

The server tests run a server of their own on the session home whose ``server.tls.crl`` is a copy of the home's PKI
(same CA), so revoking there leaves the session home's certificates alone.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import kms, service_client

from kms import config, store
from kms.client.service import Client
from kms.dev.home import Home
from kms.dev.pki import DevPki
from kms.errors import ConfigError, PermissionDenied
from kms.identity import Principal
from kms.revocation import RevocationList, load_crls
from kms.revocation import log as revocation_log
from kms.server.serve import Service

A1 = "station-a1"
B1 = "station-b1"
ERIN = Principal("auditor", "erin")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sign_crl(pki: DevPki, serials: Iterable[int] = (), *, next_update: dt.timedelta = dt.timedelta(days=7),
              last_update: dt.timedelta = dt.timedelta(minutes=-5)) -> bytes:
    """A CRL of ``pki``'s CA listing ``serials``; its times relative to now."""
    now = dt.datetime.now(dt.UTC)
    key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(_cert(pki.ca.cert).subject)
               .last_update(now + last_update).next_update(now + next_update)
               .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _replace(path: Path, data: bytes) -> None:
    """As an operator publishes a CRL: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _health(client: Client) -> int:
    reply = client.call(health_pb2_grpc.HealthStub(client.channel).Check, health_pb2.HealthCheckRequest())
    return int(reply.status)


def _station_cert(home: Home, station: str) -> x509.Certificate:
    cfg = config.load_station(home.station_config(station)).client
    assert cfg is not None
    return _cert(cfg.tls.cert)


def _config_copy(home: Home, name: str, crl: Path) -> Path:
    """kms.yaml of the session home with another server.tls.crl (written beside it: relative paths still hold)."""
    doc = yaml.safe_load(home.config.read_text())
    doc["server"]["tls"]["crl"] = str(crl)
    path = home.path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pki_copy(home: Home, tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """A development home directory holding a copy of the session home's PKI (same CA and certificates)."""
    copy = tmp_path_factory.mktemp("crl-home")
    shutil.copytree(home.path / "pki", copy / "pki")
    return DevPki(copy / "pki")


@pytest.fixture(scope="module")
def crl_service(home: Home, pki_copy: DevPki) -> Iterator[Service]:
    svc = Service(_config_copy(home, "kms-crl-test.yaml", pki_copy.crl), listen="127.0.0.1:0")
    yield svc
    svc.stop(grace=0)


@pytest.fixture
def fresh_crl(pki_copy: DevPki) -> Iterator[Path]:
    """The copy's CRL, empty again after the test."""
    yield pki_copy.crl
    _replace(pki_copy.crl, _sign_crl(pki_copy))


def _refusals(home: Home, after: int) -> list[dict[str, object]]:
    engine = store.make_engine(config.load(home.config).database)
    try:
        with engine.connect() as conn:
            bodies = conn.execute(sa.select(store.audit_log.c.body).where(store.audit_log.c.seq > after)
                                  .where(store.audit_log.c.kind == "request.refused")
                                  .order_by(store.audit_log.c.seq)).scalars()
            return [json.loads(body) for body in bodies]
    finally:
        engine.dispose()


def _audit_size(home: Home) -> int:
    engine = store.make_engine(config.load(home.config).database)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(store.audit_log.c.seq), 0))).scalar_one())
    finally:
        engine.dispose()


# -- the server ----------------------------------------------------------------------------------------------------


def test_a_revoked_station_is_refused_on_its_next_call_without_a_restart(
        home: Home, crl_service: Service, pki_copy: DevPki, fresh_crl: Path) -> None:
    before = _audit_size(home)
    serial = f"0x{_station_cert(home, A1).serial_number:X}"
    with service_client(home, crl_service, A1) as a1, service_client(home, crl_service, B1) as b1:
        assert _health(a1) == _health(b1) == health_pb2.HealthCheckResponse.SERVING
        revoked = kms("dev", "revoke-certificate", "--home", str(pki_copy.dir.parent), "--json",
                      str(pki_copy.dir / "clients" / "station-bureau-a-station-a1.pem"), check=True)
        assert json.loads(revoked.stdout)["serial"] == serial
        with pytest.raises(PermissionDenied) as refused:
            _health(a1)  # the same channel, the next call
        assert str(refused.value) == (f"the client certificate of station bureau-a/station-a1 (serial {serial}) "
                                      "is revoked")
        with pytest.raises(PermissionDenied):
            a1.batch_status("any-batch")
        assert _health(b1) == health_pb2.HealthCheckResponse.SERVING  # only that certificate
    records = [r for r in _refusals(home, before) if serial in str(r["detail"])]  # type: ignore[index]
    assert len(records) == 2, records
    assert records[0]["subject"] == "/grpc.health.v1.Health/Check" and records[0]["outcome"] == "refused"
    assert records[1]["detail"] == {  # type: ignore[index]
        "method": "/kms.v1.IssuanceService/GetBatchStatus", "status": "PERMISSION_DENIED",
        "message": f"the client certificate of station bureau-a/station-a1 (serial {serial}) is revoked"}
    # Revoking again changes nothing; a certificate of another CA is refused with one line.
    again = kms("dev", "revoke-certificate", "--home", str(pki_copy.dir.parent),
                str(pki_copy.dir / "clients" / "station-bureau-a-station-a1.pem"), check=True)
    assert serial in again.stdout and len(pki_copy.current_crl()) == 1
    other = DevPki(pki_copy.dir.parent / "other-ca").client(Principal("station", A1, bureau="bureau-a"))
    foreign = kms("dev", "revoke-certificate", "--home", str(pki_copy.dir.parent), str(other.cert))
    assert foreign.returncode == 2
    assert foreign.stderr == f"kms: error: {other.cert}: not issued by this development CA\n"


def test_a_bad_replacement_at_runtime_keeps_the_crl_in_force(
        home: Home, crl_service: Service, pki_copy: DevPki, fresh_crl: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    b1_serial = _station_cert(home, B1).serial_number
    _replace(fresh_crl, _sign_crl(pki_copy, [b1_serial]))
    other_ca = DevPki(tmp_path / "other")
    with service_client(home, crl_service, A1) as a1, service_client(home, crl_service, B1) as b1:
        with pytest.raises(PermissionDenied, match="is revoked"):
            _health(b1)
        with caplog.at_level(logging.ERROR, logger=revocation_log.name):
            for bad, reason in ((b"not a CRL\n", "no PEM certificate revocation list"),
                                (other_ca.crl.read_bytes(), "is not signed by a CA of"),
                                (b"", "no PEM certificate revocation list")):
                caplog.clear()
                fresh_crl.write_bytes(bad)  # rewritten in place, as a careless copy would
                with pytest.raises(PermissionDenied, match="is revoked"):
                    _health(b1)  # the CRL in force before still refuses b1 ...
                assert _health(a1) == health_pb2.HealthCheckResponse.SERVING  # ... and nothing else
                errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
                assert len(errors) == 1 and reason in errors[0], errors  # logged once, not on every call
                assert "the revocation list loaded before stays in force" in errors[0]
            fresh_crl.unlink()
            with pytest.raises(PermissionDenied, match="is revoked"):
                _health(b1)
        _replace(fresh_crl, _sign_crl(pki_copy))  # a good one again: applied on the next call
        assert _health(b1) == health_pb2.HealthCheckResponse.SERVING


def test_putting_an_older_crl_back_does_not_un_revoke(
        home: Home, crl_service: Service, pki_copy: DevPki, fresh_crl: Path, caplog: pytest.LogCaptureFixture) -> None:
    def number() -> int:
        return int(pki_copy.current_crl().extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

    old, old_number = fresh_crl.read_bytes(), number()
    with service_client(home, crl_service, A1) as a1, service_client(home, crl_service, B1) as b1:
        assert _health(a1) == health_pb2.HealthCheckResponse.SERVING  # the old CRL is in force
        pki_copy.revoke(pki_copy.dir / "clients" / "station-bureau-a-station-a1.pem")
        assert number() == old_number + 1
        with pytest.raises(PermissionDenied, match="is revoked"):
            _health(a1)
        with caplog.at_level(logging.ERROR, logger=revocation_log.name):
            _replace(fresh_crl, old)  # rolled back: validly signed, but CRL number n after n+1
            for _ in range(3):
                with pytest.raises(PermissionDenied, match="is revoked"):
                    _health(a1)
                assert _health(b1) == health_pb2.HealthCheckResponse.SERVING
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == [f"{fresh_crl}: the CRL of CN=kms development CA,O=kms development is older than the one in "
                          f"force (CRL number {old_number}, the newest seen is {old_number + 1}): refused, it would "
                          "un-revoke certificates; the revocation list loaded before stays in force"], errors


def test_a_crl_that_cannot_be_used_is_a_config_error_at_start(home: Home, tmp_path: Path) -> None:
    other = DevPki(tmp_path / "other")
    cases = {
        "signed by another CA": (other.crl, "CRL 1 (issuer CN=kms development CA,O=kms development) is not signed "
                                            f"by a CA of {home.path / 'pki' / 'ca.pem'}"),
        "missing": (tmp_path / "none.pem", "cannot read (No such file or directory)"),
    }
    for name, (crl, reason) in cases.items():
        path = _config_copy(home, f"kms-bad-crl-{name.replace(' ', '-')}.yaml", crl)
        with pytest.raises(ConfigError) as raised:
            Service(path, listen="127.0.0.1:0")
        assert str(raised.value) == f"server.tls.crl: {crl}: {reason}", name
        result = kms("serve", "--config", str(path), "--listen", "127.0.0.1:0")  # fails fast, one line
        assert result.returncode == 3 and result.stderr == f"kms: error: server.tls.crl: {crl}: {reason}\n", name


def test_the_crl_setting_is_checked_when_the_config_loads(home: Home) -> None:
    doc = yaml.safe_load(home.config.read_text())
    doc["server"]["tls"]["crl"] = 7
    path = home.path / "kms-crl-type.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"^server.tls.crl must be a path$"):
        config.load(path)
    doc["server"]["tls"]["crls"] = "pki/crl.pem"
    del doc["server"]["tls"]["crl"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"server\.tls: unknown setting 'crls'"):
        config.load(path)
    assert config.load(home.config).server.tls.crl == home.path / "pki" / "crl.pem"  # type: ignore[union-attr]
    station = config.load_station(home.station_config(A1)).client
    assert station is not None and station.tls.crl is not None
    assert station.tls.crl.resolve() == home.path / "pki" / "crl.pem"


# -- the client ----------------------------------------------------------------------------------------------------


def test_the_client_refuses_a_revoked_server_certificate(home: Home, crl_service: Service, tmp_path: Path) -> None:
    pki = DevPki(home.path / "pki")
    address = f"localhost:{crl_service.port}"
    doc = yaml.safe_load(home.client_config(ERIN).read_text())
    path = home.client_config(ERIN).with_name("auditor-erin+crl-test.yaml")
    crl = tmp_path / "crl.pem"
    doc["client"]["tls"]["crl"] = str(crl)
    path.write_text(yaml.safe_dump(doc))

    crl.write_bytes(_sign_crl(pki))  # nothing revoked: the client connects
    with Client(config.load_client(path), server=address) as client:
        assert _health(client) == health_pb2.HealthCheckResponse.SERVING

    crl.write_bytes(_sign_crl(pki, [_cert(pki.server().cert).serial_number]))
    with pytest.raises(PermissionDenied) as refused:
        Client(config.load_client(path), server=address)
    checked = f"127.0.0.1:{crl_service.port}"  # the address of localhost the service listens on
    assert str(refused.value) == f"the server's certificate at {checked} is revoked ({crl}); not connecting"
    result = kms("batch", "show", "--client", str(path), "--server", address, "--batch-id", "b")
    assert result.returncode == 5
    assert result.stderr == f"kms: error: the server's certificate at {checked} is revoked ({crl}); not connecting\n"

    crl.write_bytes(_sign_crl(pki, next_update=dt.timedelta(hours=-1), last_update=dt.timedelta(days=-2)))
    with pytest.raises(ConfigError, match=r"the CRL is past its nextUpdate; get a current one$"):
        Client(config.load_client(path), server=address)
    crl.write_bytes(DevPki(tmp_path / "other").crl.read_bytes())
    with pytest.raises(ConfigError, match="is not signed by a CA of"):
        Client(config.load_client(path), server=address)


def _crl_client_config(home: Home, tmp_path: Path) -> Path:
    """Erin's client configuration with client.tls.crl: the home's CRL (nothing revoked)."""
    doc = yaml.safe_load(home.client_config(ERIN).read_text())
    path = home.client_config(ERIN).with_name(f"auditor-erin+crl-{tmp_path.name}.yaml")  # its paths are relative
    doc["client"]["tls"]["crl"] = str(DevPki(home.path / "pki").crl)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_with_a_crl_one_endpoint_is_reached_only_at_the_addresses_checked(home: Home, crl_service: Service,
                                                                           tmp_path: Path) -> None:
    """gRPC does not resolve the name again (and perhaps reach an address whose certificate was never checked): the
    channel lists the checked addresses of the host, checked against the host's name."""
    with Client(config.load_client(_crl_client_config(home, tmp_path)),
                server=f"localhost:{crl_service.port}") as client:
        assert client.target.target == f"ipv4:127.0.0.1:{crl_service.port}"
        assert dict(client.target.options)["grpc.ssl_target_name_override"] == "localhost"
        assert _health(client) == health_pb2.HealthCheckResponse.SERVING


def test_an_ipv4_endpoint_listed_with_an_ipv6_one_is_reached_ipv4_mapped(home: Home, crl_service: Service,
                                                                         tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as s:  # a port nobody listens on at [::1]
        s.bind(("::1", 0))
        dead = s.getsockname()[1]
    with Client(config.load_client(_crl_client_config(home, tmp_path)),
                server=f"127.0.0.1:{crl_service.port},[::1]:{dead}") as client:
        # [::1] unreachable, its certificate unchecked: left out; the IPv4 endpoint kept, as an IPv6 address
        assert client.target.target == f"ipv6:[::ffff:127.0.0.1]:{crl_service.port}"
        assert _health(client) == health_pb2.HealthCheckResponse.SERVING


# -- the list itself -------------------------------------------------------------------------------------------------


class _Ca:
    """A CA of its own name (development CAs all share one), its key, and certificates it issues."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
        self.cert = self._builder(self.name, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(self.key, hashes.SHA256())

    def _builder(self, subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1)))

    def issue(self, uri: str) -> x509.Certificate:
        return (self._builder(x509.Name([]), ec.generate_private_key(ec.SECP256R1()).public_key())
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
                .sign(self.key, hashes.SHA256()))

    def crl(self, serials: Iterable[int] = (), next_update: dt.timedelta = dt.timedelta(days=7),
            last_update: dt.timedelta = dt.timedelta(minutes=-5)) -> bytes:
        """A CRL without a CRL number; its times relative to now."""
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
                   .last_update(now + last_update).next_update(now + next_update))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_one_file_holds_the_crls_of_several_cas(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = _Ca("kms CA one"), _Ca("kms CA two")
    one = first.issue("urn:kms:station:bureau-a:station-a1")
    two = second.issue("urn:kms:station:bureau-b:station-b1")
    cas = tmp_path / "cas.pem"
    cas.write_bytes(b"".join(ca.cert.public_bytes(serialization.Encoding.PEM) for ca in (first, second)))
    crls = tmp_path / "crls.pem"
    crls.write_bytes(first.crl())
    with pytest.raises(ConfigError) as missing:
        load_crls(crls, cas)  # every CA of the file needs its list
    assert str(missing.value) == f"{crls}: no CRL of CN=kms CA two, a CA of {cas}"
    crls.write_bytes(first.crl([one.serial_number]) + second.crl([12345]))
    listed = RevocationList(crls, cas)
    with pytest.raises(PermissionDenied) as refused:
        listed(one)
    assert str(refused.value) == (f"the client certificate of station bureau-a/station-a1 (serial "
                                  f"0x{one.serial_number:X}) is revoked")
    listed(two)  # the other CA's list does not name it
    with pytest.raises(PermissionDenied, match="from an issuer without a certificate revocation list here"):
        listed(_Ca("kms CA three").issue("urn:kms:auditor:erin"))

    # Past its nextUpdate a CRL is still enforced, with one warning per CRL.
    crls.write_bytes(first.crl([one.serial_number], dt.timedelta(days=1))
                     + second.crl([two.serial_number], dt.timedelta(days=1)))
    later = RevocationList(crls, cas, now=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    with caplog.at_level(logging.WARNING, logger=revocation_log.name):
        for _ in range(3):
            for cert in (one, two):
                with pytest.raises(PermissionDenied, match="is revoked"):
                    later(cert)
    stale = [r.getMessage() for r in caplog.records if "past its nextUpdate" in r.getMessage()]
    assert len(stale) == 2 and all("it is still enforced" in m for m in stale), stale


def test_the_development_crl_accumulates_revocations(tmp_path: Path) -> None:
    pki = DevPki(tmp_path / "pki")
    assert len(pki.current_crl()) == 0 and pki.current_crl().is_signature_valid(_cert(pki.ca.cert).public_key())
    certs = [pki.client(Principal("station", f"s{i}", bureau="b")).cert for i in range(3)]
    for path in certs[:2]:
        pki.revoke(path)
    crl = pki.current_crl()
    assert {r.serial_number for r in crl} == {_cert(p).serial_number for p in certs[:2]}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    listed = RevocationList(pki.crl, pki.ca.cert)
    listed(_cert(certs[2]))
    with pytest.raises(PermissionDenied):
        listed(_cert(certs[0]))


def test_without_crl_numbers_an_earlier_last_update_is_refused(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ca = _Ca("kms CA one")
    cert = ca.issue("urn:kms:station:bureau-a:station-a1")
    cas, crls = tmp_path / "ca.pem", tmp_path / "crl.pem"
    cas.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    crls.write_bytes(ca.crl([cert.serial_number]))
    listed = RevocationList(crls, cas)
    with caplog.at_level(logging.ERROR, logger=revocation_log.name):
        _replace(crls, ca.crl(last_update=dt.timedelta(hours=-1)))  # an empty list from before
        for _ in range(2):
            with pytest.raises(PermissionDenied, match="is revoked"):
                listed(cert)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "the CRL of CN=kms CA one is older than the one in force (lastUpdate " in errors[0]
    _replace(crls, ca.crl())  # a later one applies
    listed(cert)
    # One file holding the old and a newer CRL of the same CA: the newer counts.
    _replace(crls, ca.crl([cert.serial_number], last_update=dt.timedelta(minutes=-1))
             + ca.crl(last_update=dt.timedelta(hours=-2)))
    with pytest.raises(PermissionDenied, match="is revoked"):
        listed(cert)


# -- a client key kept in OpenBao: loaded for the CRL check without a file on disk ----------------------------------


def test_a_client_key_from_a_reference_is_loaded_from_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from kms.revocation import _load_cert_chain
    from kms.secrets import SecretRef

    pki = DevPki(tmp_path / "pki")
    cred = pki.client(Principal("station", "station-a1", bureau="bureau-a"))
    monkeypatch.setenv("KMS_TEST_TLS_KEY", cred.key.read_text())
    before = set((tmp_path).rglob("*"))
    tls = config.TlsConfig(cred.cert, SecretRef("env", "KMS_TEST_TLS_KEY"), pki.ca.cert)
    _load_cert_chain(ssl.create_default_context(), tls)  # raises if the key does not match the certificate
    assert set((tmp_path).rglob("*")) == before  # nothing written
    other = pki.client(Principal("station", "station-b1", bureau="bureau-b"))
    monkeypatch.setenv("KMS_TEST_TLS_KEY", other.key.read_text())
    with pytest.raises(ssl.SSLError):
        _load_cert_chain(ssl.create_default_context(), tls)
