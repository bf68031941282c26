"""Security officers: who they are, their domain and roles, and their personal approval keys.

An officer is the principal of their mTLS certificate (``urn:kms:officer:<domain>:<name>``) plus an ECDSA P-256
approval key: the certificate says who is calling, the approval key's signature says what exactly they agreed to.
In development the private approval key is a PEM file (``ApprovalKeyFile``); the code only ever asks it to sign, so
a smartcard token can stand in for it.

The first officers of each domain are enrolled by the genesis ceremony at ``kms init``; every later enrolment is an
``enrol-officer`` ceremony of the domain.

With an audit log (kms.audit.log), enrolment and revocation append ``officer.enrolled`` / ``officer.revoked`` in the
same transaction (fail closed); the approval key appears as its fingerprint.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.audit.log import AuditLog
from kms.ceremony.rules import Officer
from kms.clock import Clock, rfc3339
from kms.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound
from kms.files import open_private
from kms.identity import Principal, parse_uri
from kms.registry import check_domain
from kms.repository import Repository
from kms.store import officers

ROLES = ("approver", "key-custodian")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")


def parse_public_key(pem: str, field: str = "public_key") -> ec.EllipticCurvePublicKey:
    """An officer's approval public key: an ECDSA P-256 SubjectPublicKeyInfo in PEM."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidArgument(field, "is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidArgument(field, "must be an ECDSA P-256 public key")
    return key


def public_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def check_roles(roles: Iterable[str], field: str = "roles") -> frozenset[str]:
    chosen = frozenset(roles)
    if not chosen or not chosen <= set(ROLES):
        raise InvalidArgument(field, f"must be one or more of {', '.join(ROLES)}")
    return chosen


def check_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(field, "must be 1-32 lower-case letters, digits or '-', starting with a letter")
    return name


class ApprovalKeyFile:
    """A development approval key: an unencrypted PKCS#8 PEM file readable by its owner only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path) -> ApprovalKeyFile:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        with open_private(path, "wb", exclusive=True) as out:
            out.write(pem)
        return cls(path)

    def _key(self) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        except (OSError, ValueError) as error:
            raise InvalidArgument("approval_key", f"cannot read an approval key from {self.path} "
                                                  f"({type(error).__name__})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument("approval_key", f"{self.path} is not an ECDSA key")
        return key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key().public_key()

    def sign(self, message: bytes) -> bytes:
        return self._key().sign(message, ec.ECDSA(hashes.SHA256()))

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """For decrypting a component sent to this officer (escrow export); never leaves this process."""
        return self._key()


@dataclass(frozen=True)
class OfficerRecord:
    officer: Officer
    public_key_pem: str
    state: str
    enrolled_at: str
    enrolled_by: str
    cert_sha256: str = ""


class OfficerStore(Repository):
    def __init__(self, engine: sa.Engine, clock: Clock, audit: AuditLog | None = None) -> None:
        super().__init__(engine, clock, audit)

    def enrol(self, principal: Principal, roles: Iterable[str], public_key_pem: str, enrolled_by: str,
              conn: sa.Connection | None = None, *, cert_sha256: str) -> OfficerRecord:
        """Enrol an officer with roles, an approval key and the pin of their client certificate (kms.principals)."""
        if principal.role != "officer" or principal.domain is None:
            raise InvalidArgument("principal", "must be an officer of a domain")
        check_domain(principal.domain)
        check_name(principal.name)
        chosen = check_roles(roles)
        parse_public_key(public_key_pem)
        values = dict(principal=principal.uri(), domain=principal.domain, name=principal.name,
                      roles=" ".join(sorted(chosen)), public_key=public_key_pem, state="active",
                      enrolled_at=rfc3339(self._clock.now()), enrolled_by=enrolled_by, cert_sha256=cert_sha256)
        if conn is not None:
            self._enrol(conn, principal, values)
        else:
            with self._engine.begin() as own:
                self._enrol(own, principal, values)
        return self.get(principal) if conn is None else _record(values)

    def _enrol(self, conn: sa.Connection, principal: Principal, values: dict[str, Any]) -> None:
        try:
            conn.execute(officers.insert().values(**values))
        except sa.exc.IntegrityError:
            raise AlreadyExists(f"{principal} is already enrolled") from None
        if self._audit is not None:
            self._audit.append(conn, "officer.enrolled", domain=principal.domain or "", subject=principal.uri(),
                               detail={"roles": values["roles"].split(), "enrolled_by": values["enrolled_by"],
                                       "key_fingerprint": _fingerprint(values["public_key"]),
                                       "cert_sha256": values["cert_sha256"]})

    def revoke(self, principal: Principal) -> OfficerRecord:
        """An officer who no longer counts for anything (a revoke-officer ceremony): conditional on being active."""
        with self._engine.begin() as conn:
            changed = conn.execute(officers.update().where(
                officers.c.principal == principal.uri(), officers.c.state == "active").values(state="revoked")).rowcount
            if changed == 1 and self._audit is not None:
                self._audit.append(conn, "officer.revoked", domain=principal.domain or "", subject=principal.uri(),
                                   detail={"state": "revoked"})
        if changed != 1:
            raise InvalidState(f"{principal} is not an active officer")
        return self.get(principal)

    def key_in_use(self, public_key_pem: str) -> bool:
        """Whether any officer (either domain, any state) already has this approval key."""
        wanted = _der(parse_public_key(public_key_pem))
        return any(_der(r.officer.public_key) == wanted for r in self.all())

    def get(self, principal: Principal) -> OfficerRecord:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(officers).where(officers.c.principal == principal.uri())).first()
        if row is None:
            raise NotFound(f"{principal} is not an enrolled officer")
        return _record(row._mapping)

    def all(self, domain: str | None = None) -> list[OfficerRecord]:
        query = sa.select(officers).order_by(officers.c.domain, officers.c.name)
        if domain is not None:
            query = query.where(officers.c.domain == domain)
        with self._engine.connect() as conn:
            return [_record(r._mapping) for r in conn.execute(query)]

    def active(self, domain: str) -> Mapping[Principal, Officer]:
        """The domain's active officers, as ``kms.ceremony.rules.evaluate`` takes them."""
        return {r.officer.principal: r.officer for r in self.all(domain) if r.state == "active"}

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(officers)).scalar_one())


def _der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _fingerprint(pem: str) -> str:
    """As kms.ceremony.operations.fingerprint shows an approval key (SHA-256 of its DER, first 32 hex digits)."""
    return hashlib.sha256(_der(parse_public_key(pem))).hexdigest()[:32]


def _record(m: Mapping[Any, Any]) -> OfficerRecord:
    pem = str(m["public_key"])
    officer = Officer(parse_uri(str(m["principal"])), frozenset(str(m["roles"]).split()), parse_public_key(pem))
    return OfficerRecord(officer, pem, str(m["state"]), str(m["enrolled_at"]), str(m["enrolled_by"]),
                         str(m["cert_sha256"]))
