"""A development PKI for mutual TLS: a CA, a server certificate for loopback, and client certificates whose URI
SAN names the principal (kms.identity). Production deployments bring their own CA; kms only needs its certificate.

Layout under a directory: ca.pem (+ ca.key), crl.pem (the CA's certificate revocation list, empty at first),
server.pem/server.key, clients/<file>.pem/.key. Files are written 0600, directories 0700 (kms.files). Idempotent:
existing files are kept. ``revoke`` adds a certificate to the CRL (kms.revocation checks it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kms.errors import ConfigError, InvalidArgument
from kms.files import private_dir, write_private
from kms.identity import Principal

VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
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
        self.crl = directory / "crl.pem"
        private_dir(directory)
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
            write_private(self.ca.cert, cert.public_bytes(serialization.Encoding.PEM))
        if not self.crl.exists():
            self._write_crl([], 1)

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
        write_private(cred.cert, cert.public_bytes(serialization.Encoding.PEM))
        return cred

    def server(self, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Credential:
        san: list[x509.GeneralName] = []
        for host in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                san.append(x509.DNSName(host))
        return self._issue(self.dir / "server", "kms server", san, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, principal: Principal, tag: str = "") -> Credential:
        """The client certificate of a principal (made once). With ``tag``, another certificate and key for the same
        principal, kept apart (a re-certification: the principal registry refuses it until it is pinned)."""
        file = principal.uri().removeprefix("urn:kms:").replace(":", "-") + (f"+{tag}" if tag else "")
        return self._issue(self.dir / "clients" / file, str(principal),
                           [x509.UniformResourceIdentifier(principal.uri())], ExtendedKeyUsageOID.CLIENT_AUTH)

    # -- revocation ------------------------------------------------------------------------------------------------

    def revoke(self, cert_path: Path) -> x509.Certificate:
        """Add the certificate in ``cert_path`` (PEM, issued by this CA) to the CRL and rewrite crl.pem (atomically,
        a new CRL number). Revoking a certificate twice changes nothing. Returns the certificate."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as error:
            raise InvalidArgument(str(cert_path), f"cannot read ({error.strerror})") from None
        except ValueError:
            raise InvalidArgument(str(cert_path), "not a PEM certificate") from None
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidArgument(str(cert_path), "not issued by this development CA") from None
        crl = self.current_crl()
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            return cert
        now = dt.datetime.now(dt.UTC)
        entry = (x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now)
                 .add_extension(x509.CRLReason(x509.ReasonFlags.cessation_of_operation), critical=False).build())
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        self._write_crl([*crl, entry], number + 1, now)
        return cert

    def current_crl(self) -> x509.CertificateRevocationList:
        try:
            return x509.load_pem_x509_crl(self.crl.read_bytes())
        except (OSError, ValueError):
            raise ConfigError(f"{self.crl}: not a readable PEM CRL") from None

    def _write_crl(self, revoked: list[x509.RevokedCertificate], number: int, now: dt.datetime | None = None) -> None:
        """A CRL signed by the CA. Its nextUpdate is as far off as the certificates' validity: a development home
        has nobody to re-sign it every few days (production CAs publish CRLs that expire within days)."""
        now = now or self._now
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + VALIDITY)
                   .add_extension(x509.CRLNumber(number), critical=False))
        for entry in revoked:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(_load_key(self.ca.key), hashes.SHA256())
        write_private(self.crl, crl.public_bytes(serialization.Encoding.PEM))
