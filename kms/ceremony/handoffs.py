"""Transport key hand-off to a bureau's station (register-transport-key with method rsa-oaep).

The key (AES256 or SM4) is generated in the domain's token and registered ``pre-activation``; the ceremony leaves it
here wrapped under the one station's RSA public key the approvers signed off, a key the station made for this one
hand-off (a key a transport key was once wrapped under is refused for any later hand-off: ``used``). Only that
station fetches it; it unwraps it into its own token, destroys its unwrap key and confirms the KCV, and only then
does the key become ``active`` (so no bundle is sealed under a key the bureau does not yet hold). The wrapped bytes
are erased on acceptance and never appear in results, minutes or audit records (``handoff.offered`` and
``handoff.confirmed`` name the key, the station and the KCV; each appended in the transaction of its change).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from kms.audit.log import AuditLog
from kms.clock import Clock, rfc3339
from kms.errors import InvalidArgument, NotFound
from kms.identity import Principal
from kms.registry import KeyKind, KeyRegistry, KeyState
from kms.repository import Repository
from kms.store import ceremonies, transport_handoffs


@dataclass(frozen=True)
class Handoff:
    domain: str
    bureau: str
    version: int
    station: str
    wrapped: bytes
    kcv: str
    label: str
    algorithm: str = "AES256"  # the transport key's (kms.hsm.types.Algorithm): what the station unwraps it as
    unwrap_key_sha256: str = ""  # SHA-256 (hex) of the station's public key it is wrapped under (SPKI DER)


class TransportHandoffs(Repository):
    def __init__(self, engine: sa.Engine, registry: KeyRegistry, clock: Clock, audit: AuditLog | None = None) -> None:
        super().__init__(engine, clock, audit)
        self._registry = registry

    def offer(self, domain: str, bureau: str, version: int, station: str, wrapped: bytes, kcv: str,
              ceremony_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(transport_handoffs.insert().values(
                domain=domain, bureau=bureau, version=version, station=station, wrapped=wrapped, kcv=kcv,
                ceremony_id=ceremony_id, created_at=rfc3339(self._clock.now())))
            if self._audit is not None:
                self._audit.append(conn, "handoff.offered", domain=domain, subject=f"{bureau}/v{version}", detail={
                    "bureau": bureau, "version": version, "station": station, "kcv": kcv, "ceremony_id": ceremony_id,
                    "unwrap_key_sha256": _unwrap_key_sha256(conn, ceremony_id)})

    def used(self, unwrap_key_sha256: str) -> bool:
        """Whether a transport key was ever wrapped under the station public key with this SHA-256 (hand-off keys
        are single use; rows stay after acceptance, with the wrapped bytes erased). Read from the approved
        proposals of the hand-offs (one per bureau, domain and key version: few rows)."""
        with self._engine.connect() as conn:
            ids = conn.execute(sa.select(transport_handoffs.c.ceremony_id)).scalars().all()
            return any(_unwrap_key_sha256(conn, ceremony_id) == unwrap_key_sha256 for ceremony_id in ids)

    def pending(self, station: Principal, domain: str) -> Handoff:
        """The newest transport key waiting for this station in this domain."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(transport_handoffs).where(
                transport_handoffs.c.domain == domain, transport_handoffs.c.station == station.uri(),
                transport_handoffs.c.accepted_at.is_(None),
            ).order_by(transport_handoffs.c.version.desc()).limit(1)).first()
            if row is None:
                raise NotFound(f"no {domain} transport key is waiting for {station}")
            sha256 = _unwrap_key_sha256(conn, row.ceremony_id)
        record = self._registry.get(domain, KeyKind.TRANSPORT, row.bureau, row.version)
        return Handoff(domain, row.bureau, row.version, row.station, bytes(row.wrapped), row.kcv, record.label,
                       record.algorithm, sha256)

    def confirm(self, station: Principal, domain: str, version: int, kcv: str) -> Handoff:
        """The station unwrapped the key and computed this KCV: if it is the issuer's, the key becomes active and
        the wrapped copy is erased; otherwise nothing changes."""
        handoff = self.pending(station, domain)
        if handoff.version != version:
            raise InvalidArgument("version", f"the {domain} transport key waiting for {station} is v{handoff.version}")
        if kcv.strip().upper() != handoff.kcv:
            raise InvalidArgument("kcv", "does not match the issued transport key's; the key stays inactive")
        record = self._registry.get(domain, KeyKind.TRANSPORT, handoff.bureau, version)
        if record.state is KeyState.PRE_ACTIVATION:
            self._registry.transition(record, KeyState.ACTIVE)
        with self._engine.begin() as conn:
            accepted = conn.execute(transport_handoffs.update().where(
                transport_handoffs.c.domain == domain, transport_handoffs.c.bureau == handoff.bureau,
                transport_handoffs.c.version == version, transport_handoffs.c.accepted_at.is_(None),
            ).values(wrapped=b"", accepted_at=rfc3339(self._clock.now()))).rowcount
            if accepted == 1 and self._audit is not None:
                self._audit.append(conn, "handoff.confirmed", actor=station.uri(), domain=domain,
                                   subject=f"{handoff.bureau}/v{version}", detail={
                                       "bureau": handoff.bureau, "version": version, "label": handoff.label,
                                       "kcv": handoff.kcv})
        return handoff


def _unwrap_key_sha256(conn: sa.Connection, ceremony_id: str) -> str:
    """The SHA-256 (hex, of the SPKI DER) of the station public key the hand-off of this ceremony is wrapped under,
    from its approved proposal (``public_key_sha256``, or its ``public_key`` in proposals made before that
    parameter); "" if the ceremony is not on record."""
    encoding = conn.execute(sa.select(ceremonies.c.encoding).where(
        ceremonies.c.ceremony_id == ceremony_id)).scalar_one_or_none()
    if encoding is None:
        return ""
    params = json.loads(bytes(encoding)).get("params", {})
    if isinstance(params.get("public_key_sha256"), str):
        return str(params["public_key_sha256"])
    public = serialization.load_pem_public_key(str(params.get("public_key", "")).encode("ascii"))
    return hashlib.sha256(public.public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
