"""The principal registry: who may call kms at all, checked on every call against the records, not only the
certificate (docs/issuance-service.md, section 2).

A certificate from the configured CA says who the caller claims to be; the registry says whether that principal is
enrolled and active, for which key domains, and with which certificate key:

- an **officer** is enrolled in the domain their URI names (``officers``: genesis or ``enrol-officer``), active
  until a ``revoke-officer`` ceremony, and pinned to one certificate key (``renew-certificate`` moves the pin);
- a **station** or an **auditor** is registered by each key domain separately (``principal_grants``: the genesis of
  a development home, then ``register-station`` / ``enrol-auditor`` ceremonies of that domain; ``revoke-station`` /
  ``revoke-auditor`` end it). Each domain pins the certificate key it approved, so a station re-certified with a new
  key acts for a domain again only once that domain registers the new key.

The pin is the SHA-256 of the certificate's SubjectPublicKeyInfo (DER): a second certificate for the same URI from
the same CA, with another key, is refused. An unknown, revoked or wrongly keyed principal is refused on every method
(``PermissionDenied``), and the service's interceptor records the refusal in the audit log.

With an audit log every change appends ``principal.registered`` / ``principal.revoked`` in the same transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from kms.audit.log import AuditLog
from kms.clock import Clock, rfc3339
from kms.errors import InvalidArgument, InvalidState, PermissionDenied
from kms.identity import Principal, from_certificate, parse_uri
from kms.registry import check_domain
from kms.repository import Repository
from kms.store import officers, principal_grants

ACTIVE = "active"
REVOKED = "revoked"


def certificate_pin(cert: x509.Certificate) -> str:
    """The pin of a certificate: SHA-256 (hex) of its SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def parse_certificate(pem: object, field: str, expected: Principal) -> str:
    """The pin of a PEM client certificate that names ``expected`` (ceremony parameters); InvalidArgument naming
    ``field`` otherwise."""
    if not isinstance(pem, str) or not pem.strip() or len(pem) > 16384:
        raise InvalidArgument(field, "must be the PEM of the principal's client certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidArgument(field, "is not a PEM X.509 certificate") from None
    try:
        named = from_certificate(cert)
        pin = certificate_pin(cert)
    except PermissionDenied as error:
        raise InvalidArgument(field, str(error)) from None
    except (ValueError, TypeError, x509.DuplicateExtension, UnsupportedAlgorithm):  # extensions or key unreadable
        raise InvalidArgument(field, "has extensions or a public key that cannot be read") from None
    if named != expected:
        raise InvalidArgument(field, f"names {named.uri()}, not {expected.uri()}")
    return pin


@dataclass(frozen=True)
class Grant:
    """What a verified caller may act for: the key domains that registered it with this certificate key."""

    principal: Principal
    domains: frozenset[str]


@dataclass(frozen=True)
class GrantRecord:
    principal: Principal
    domain: str
    cert_sha256: str
    state: str
    ceremony_id: str
    changed_at: str


class PrincipalRegistry(Repository):
    def __init__(self, engine: sa.Engine, clock: Clock, audit: AuditLog | None = None) -> None:
        super().__init__(engine, clock, audit)

    # -- the check on every call ------------------------------------------------------------------------------------

    def authenticate(self, principal: Principal, pin: str) -> Grant:
        """The domains this principal may act for with a certificate of this pin; PermissionDenied, saying why,
        for a principal that is unknown, revoked, or presenting another certificate key than the registered one."""
        with self._engine.connect() as conn:
            if principal.role == "officer":
                row = conn.execute(sa.select(officers.c.state, officers.c.cert_sha256).where(
                    officers.c.principal == principal.uri())).first()
                rows = [] if row is None else [(principal.domain or "", row.state, row.cert_sha256)]
            else:
                rows = [(r.domain, r.state, r.cert_sha256) for r in conn.execute(
                    sa.select(principal_grants.c.domain, principal_grants.c.state, principal_grants.c.cert_sha256)
                    .where(principal_grants.c.principal == principal.uri()))]
        if not rows:
            raise PermissionDenied(f"{principal} is not enrolled in kms")
        active = [(domain, cert) for domain, state, cert in rows if state == ACTIVE]
        if not active:
            raise PermissionDenied(f"{principal} was revoked")
        domains = frozenset(domain for domain, cert in active if cert == pin)
        if not domains:
            raise PermissionDenied(f"{principal} presented a certificate whose key is not the one registered for it")
        return Grant(principal, domains)

    # -- stations and auditors --------------------------------------------------------------------------------------

    def register(self, principal: Principal, domain: str, pin: str, ceremony_id: str,
                 conn: sa.Connection | None = None) -> GrantRecord:
        """Register (or re-register with a new certificate key) a station or auditor for one domain."""
        if principal.role not in ("station", "auditor"):
            raise InvalidArgument("principal", "must be a station or an auditor")
        check_domain(domain)
        now = rfc3339(self._clock.now())
        values = dict(principal=principal.uri(), domain=domain, role=principal.role, cert_sha256=pin, state=ACTIVE,
                      ceremony_id=ceremony_id, changed_at=now)
        if conn is None:
            with self._engine.begin() as own:
                self._register(own, principal, values)
        else:
            self._register(conn, principal, values)
        return GrantRecord(principal, domain, pin, ACTIVE, ceremony_id, now)

    def _register(self, conn: sa.Connection, principal: Principal, values: dict[str, str]) -> None:
        changed = conn.execute(principal_grants.update().where(
            principal_grants.c.principal == values["principal"], principal_grants.c.domain == values["domain"])
            .values(**values)).rowcount
        if changed == 0:
            conn.execute(principal_grants.insert().values(**values))
        if self._audit is not None:
            self._audit.append(conn, "principal.registered", domain=values["domain"], subject=principal.uri(),
                               detail={"role": principal.role, "cert_sha256": values["cert_sha256"],
                                       "ceremony_id": values["ceremony_id"]})

    def revoke(self, principal: Principal, domain: str, ceremony_id: str) -> GrantRecord:
        """End a station's or auditor's registration by one domain (conditional on it being active)."""
        now = rfc3339(self._clock.now())
        with self._engine.begin() as conn:
            changed = conn.execute(principal_grants.update().where(
                principal_grants.c.principal == principal.uri(), principal_grants.c.domain == domain,
                principal_grants.c.state == ACTIVE).values(state=REVOKED, ceremony_id=ceremony_id,
                                                           changed_at=now)).rowcount
            if changed == 1 and self._audit is not None:
                self._audit.append(conn, "principal.revoked", domain=domain, subject=principal.uri(),
                                   detail={"role": principal.role, "ceremony_id": ceremony_id})
        if changed != 1:
            raise InvalidState(f"{principal} is not registered for the {domain} domain")
        return self.get(principal, domain)

    def get(self, principal: Principal, domain: str) -> GrantRecord:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(principal_grants).where(
                principal_grants.c.principal == principal.uri(), principal_grants.c.domain == domain)).first()
        if row is None:
            raise InvalidState(f"{principal} was never registered by the {domain} domain")
        return _grant(row._mapping)

    def active(self, principal: Principal, domain: str) -> bool:
        try:
            return self.get(principal, domain).state == ACTIVE
        except InvalidState:
            return False

    # -- officers' certificate pins ---------------------------------------------------------------------------------

    def repin_officer(self, principal: Principal, pin: str, ceremony_id: str) -> None:
        """Move an active officer's certificate pin to a new certificate key (renew-certificate)."""
        with self._engine.begin() as conn:
            changed = conn.execute(officers.update().where(
                officers.c.principal == principal.uri(), officers.c.state == ACTIVE).values(cert_sha256=pin)).rowcount
            if changed == 1 and self._audit is not None:
                self._audit.append(conn, "principal.registered", domain=principal.domain or "",
                                   subject=principal.uri(), detail={"role": "officer", "cert_sha256": pin,
                                                                    "ceremony_id": ceremony_id})
        if changed != 1:
            raise InvalidState(f"{principal} is not an active officer")


def _grant(m: Mapping[Any, Any]) -> GrantRecord:
    return GrantRecord(parse_uri(str(m["principal"])), str(m["domain"]), str(m["cert_sha256"]), str(m["state"]),
                       str(m["ceremony_id"]), str(m["changed_at"]))
