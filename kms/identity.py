"""Principals: who is calling, taken only from a verified client certificate.

A principal is encoded in the certificate's URI subject alternative name:

  urn:kms:station:<bureau>:<station>     a personalization station of a bureau
  urn:kms:officer:<domain>:<name>        a security officer of one key domain (hrss or bank)
  urn:kms:auditor:<name>                 an auditor

Nothing else in a request (metadata, fields) can change who the caller is.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from kms.errors import PermissionDenied
from kms.registry import DOMAINS
from kms.validation import NAME

ROLES = ("station", "officer", "auditor")
PREFIX = "urn:kms:"


@dataclass(frozen=True)
class Principal:
    role: str
    name: str
    domain: str | None = None  # officers
    bureau: str | None = None  # stations

    def uri(self) -> str:
        if self.role == "station":
            return f"{PREFIX}station:{self.bureau}:{self.name}"
        if self.role == "officer":
            return f"{PREFIX}officer:{self.domain}:{self.name}"
        return f"{PREFIX}auditor:{self.name}"

    def __str__(self) -> str:
        where = self.bureau or self.domain
        return f"{self.role} {where}/{self.name}" if where else f"{self.role} {self.name}"


def parse_uri(uri: str) -> Principal:
    """The principal a kms URI names; PermissionDenied if it is not one."""
    if not uri.startswith(PREFIX):
        raise PermissionDenied("the client certificate names no kms principal")
    parts = uri[len(PREFIX):].split(":")
    role = parts[0]
    if role == "station" and len(parts) == 3 and all(NAME.fullmatch(p) for p in parts[1:]):
        return Principal(role="station", bureau=parts[1], name=parts[2])
    if role == "officer" and len(parts) == 3 and parts[1] in DOMAINS and NAME.fullmatch(parts[2]):
        return Principal(role="officer", domain=parts[1], name=parts[2])
    if role == "auditor" and len(parts) == 2 and NAME.fullmatch(parts[1]):
        return Principal(role="auditor", name=parts[1])
    raise PermissionDenied("the client certificate names no valid kms principal")


def from_certificate(cert: x509.Certificate) -> Principal:
    """The one kms principal in a certificate's URI SANs (exactly one must be present)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PermissionDenied("the client certificate has no subject alternative name") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(PREFIX)]
    if len(uris) != 1:
        raise PermissionDenied("the client certificate must name exactly one kms principal")
    return parse_uri(uris[0])


def from_pem(pem: bytes) -> Principal:
    return from_certificate(x509.load_pem_x509_certificate(pem))
