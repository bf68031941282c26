"""A development PKI for mutual TLS: a CA, a server certificate for loopback, and client certificates whose URI
SAN names the principal (kms.identity). Production deployments bring their own CA; kms only needs its certificate.

Layout under a directory: ca.pem (+ ca.key), server.pem/server.key, clients/<file>.pem/.key. Private keys are
written 0600. Idempotent: existing files are kept.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kms.identity import Principal

VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kms development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class DevPki:
    def __init__(self, directory: Path, now: dt.datetime | None = None) -> None:
        self.dir = directory
        self._now = now or dt.datetime.now(dt.UTC)
        self.ca = Credential(directory / "ca.pem", directory / "ca.key")
        if not self.ca.cert.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                self._builder(_name("kms development CA"), _name("kms development CA"), key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .sign(key, hashes.SHA256())
            )
            _write_key(self.ca.key, key)
            self.ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(self._now - dt.timedelta(minutes=5)).not_valid_after(self._now + VALIDITY))

    def _issue(self, base: Path, common_name: str, san: list[x509.GeneralName], usage: x509.ObjectIdentifier
               ) -> Credential:
        cred = Credential(base.with_suffix(".pem"), base.with_suffix(".key"))
        if cred.cert.exists() and cred.key.exists():
            return cred
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._builder(_name(common_name), ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(_load_key(self.ca.key), hashes.SHA256())
        )
        _write_key(cred.key, key)
        cred.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cred

    def server(self, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Credential:
        san: list[x509.GeneralName] = []
        for host in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                san.append(x509.DNSName(host))
        return self._issue(self.dir / "server", "kms server", san, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, principal: Principal) -> Credential:
        file = principal.uri().removeprefix("urn:kms:").replace(":", "-")
        return self._issue(self.dir / "clients" / file, str(principal),
                           [x509.UniformResourceIdentifier(principal.uri())], ExtendedKeyUsageOID.CLIENT_AUTH)
