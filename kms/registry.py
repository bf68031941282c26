"""The key registry: which keys exist in which domain's token, their versions and states.

Records live in the store; the key material lives only in the token, under the label the registry gives it.
States follow NIST SP 800-57: a key made by a ceremony is registered pre-activation and activated only once its
KCV is checked; ``transition`` allows only the moves in ``TRANSITIONS``, each time-stamped.

With an audit log (kms.audit.log) every change appends its record in the same transaction (fail closed): ``key.added``,
``key.state``, ``key.kcv``, ``key.removed`` — label, kind, version, state and KCV, never a key value.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from kms.audit.log import AuditLog
from kms.clock import Clock, rfc3339
from kms.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound
from kms.hsm.labels import key_label
from kms.repository import Repository
from kms.store import keys

DOMAINS = ("hrss", "bank")


class KeyKind(enum.StrEnum):
    MASTER = "master"
    TRANSPORT = "transport"
    SIGNING = "signing"
    CUSTODY = "custody"  # the domain's RSA key for components in ceremonies (kms.ceremony.components)
    DATA = "data"  # cardholder data at rest: the bank's PAN encryption and PAN index keys (kms.issuance.pans)


class KeyState(enum.StrEnum):
    PRE_ACTIVATION = "pre-activation"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DEACTIVATED = "deactivated"
    COMPROMISED = "compromised"
    DESTROYED = "destroyed"


#: The transitions NIST SP 800-57 Part 1 (section 7) allows between key states; anything else is refused.
TRANSITIONS: dict[KeyState, frozenset[KeyState]] = {
    KeyState.PRE_ACTIVATION: frozenset({KeyState.ACTIVE, KeyState.COMPROMISED, KeyState.DESTROYED}),
    KeyState.ACTIVE: frozenset({KeyState.SUSPENDED, KeyState.DEACTIVATED, KeyState.COMPROMISED}),
    KeyState.SUSPENDED: frozenset({KeyState.ACTIVE, KeyState.DEACTIVATED, KeyState.COMPROMISED}),
    KeyState.DEACTIVATED: frozenset({KeyState.COMPROMISED, KeyState.DESTROYED}),
    KeyState.COMPROMISED: frozenset({KeyState.DESTROYED}),
    KeyState.DESTROYED: frozenset(),
}


def check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise InvalidArgument("domain", f"must be one of {', '.join(DOMAINS)}")
    return domain


@dataclass(frozen=True)
class KeyRecord:
    domain: str
    kind: KeyKind
    name: str
    version: int
    algorithm: str
    state: KeyState
    label: str
    kcv: str | None
    kcv_method: str | None
    public_key: bytes | None
    created_at: str
    state_changed_at: str = ""


class KeyRegistry(Repository):
    def __init__(self, engine: sa.Engine, clock: Clock, audit: AuditLog | None = None) -> None:
        super().__init__(engine, clock, audit)

    def add(
        self,
        domain: str,
        kind: KeyKind,
        name: str,
        algorithm: str,
        *,
        kcv: str | None = None,
        kcv_method: str | None = None,
        public_key: bytes | None = None,
        state: KeyState = KeyState.ACTIVE,
        version: int | None = None,
    ) -> KeyRecord:
        """Register a key (the next version of its name unless given). The caller puts it into the token."""
        check_domain(domain)
        now = rfc3339(self._clock.now())
        with self._engine.begin() as conn:
            if version is None:
                current = conn.execute(
                    sa.select(sa.func.max(keys.c.version)).where(
                        keys.c.domain == domain, keys.c.kind == kind.value, keys.c.name == name
                    )
                ).scalar()
                version = (current or 0) + 1
            label = key_label(domain, kind, name, version)
            try:
                conn.execute(
                    keys.insert().values(
                        domain=domain, kind=kind.value, name=name, version=version, algorithm=algorithm,
                        state=state.value, label=label, kcv=kcv, kcv_method=kcv_method, public_key=public_key,
                        created_at=now, state_changed_at=now,
                    )
                )
            except sa.exc.IntegrityError:
                raise AlreadyExists(f"{domain} {kind.value} key {name} v{version} already exists") from None
            if self._audit is not None:
                self._audit.append(conn, "key.added", domain=domain, subject=label, detail={
                    "kind": kind.value, "name": name, "version": version, "algorithm": algorithm,
                    "state": state.value, "kcv": kcv or "", "kcv_method": kcv_method or "",
                    **_public_key_detail(public_key)})
        return self.get(domain, kind, name, version)

    def transition(self, record: KeyRecord, to: KeyState, *, keep_one_active: bool = False) -> KeyRecord:
        """Move a key to another state if NIST SP 800-57 allows it from its current one (InvalidState otherwise),
        time-stamped from the clock. Conditional on the state not having changed meanwhile (another replica).

        ``keep_one_active``: refused (InvalidState, nothing changed) if no other version of the key's name would be
        active afterwards, decided in the transaction that changes it: every version's row is locked first, in
        version order (PostgreSQL; SQLite's one writer holds its write lock from the UPDATE on), so that of two
        such changes running at once the second sees the first's."""
        if to not in TRANSITIONS[record.state]:
            allowed = ", ".join(sorted(s.value for s in TRANSITIONS[record.state])) or "none"
            raise InvalidState(f"{record.label} cannot go from {record.state.value} to {to.value} "
                               f"(allowed: {allowed})")
        now = rfc3339(self._clock.now())
        same_name = sa.and_(keys.c.domain == record.domain, keys.c.kind == record.kind.value,
                            keys.c.name == record.name)
        with self._engine.begin() as conn:
            if keep_one_active:
                conn.execute(sa.select(keys.c.label).where(same_name).order_by(keys.c.version).with_for_update())
            changed = conn.execute(
                keys.update()
                .where(keys.c.label == record.label, keys.c.state == record.state.value)
                .values(state=to.value, state_changed_at=now)
            ).rowcount
            if changed == 1 and keep_one_active and conn.execute(
                    sa.select(sa.func.count()).select_from(keys).where(
                        same_name, keys.c.state == KeyState.ACTIVE.value)).scalar_one() == 0:
                raise InvalidState(f"{record.label} is the only active version of the {record.domain} "
                                   f"{record.name} key (another was retired meanwhile); it stays {record.state.value}")
            if changed == 1 and self._audit is not None:
                self._audit.append(conn, "key.state", domain=record.domain, subject=record.label, detail={
                    "kind": record.kind.value, "name": record.name, "version": record.version,
                    "from": record.state.value, "to": to.value, "kcv": record.kcv or ""})
        if changed != 1:
            raise InvalidState(f"{record.label} changed state meanwhile; read it again")
        return self.get(record.domain, record.kind, record.name, record.version)

    def set_kcv(self, record: KeyRecord, kcv: str, kcv_method: str, public_key: bytes | None = None) -> None:
        with self._engine.begin() as conn:
            changed = conn.execute(
                keys.update()
                .where(keys.c.label == record.label)
                .values(kcv=kcv, kcv_method=kcv_method, public_key=public_key)
            ).rowcount
            if changed == 1 and self._audit is not None:
                self._audit.append(conn, "key.kcv", domain=record.domain, subject=record.label, detail={
                    "kind": record.kind.value, "name": record.name, "version": record.version, "kcv": kcv,
                    "kcv_method": kcv_method, **_public_key_detail(public_key)})

    def remove(self, record: KeyRecord) -> None:
        """Forget a record whose token object could not be created (never for a key that existed)."""
        with self._engine.begin() as conn:
            removed = conn.execute(keys.delete().where(keys.c.label == record.label)).rowcount
            if removed == 1 and self._audit is not None:
                self._audit.append(conn, "key.removed", domain=record.domain, subject=record.label, detail={
                    "kind": record.kind.value, "name": record.name, "version": record.version,
                    "reason": "its token object could not be created"})

    def get(self, domain: str, kind: KeyKind, name: str, version: int) -> KeyRecord:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(keys).where(
                    keys.c.domain == domain, keys.c.kind == kind.value, keys.c.name == name,
                    keys.c.version == version,
                )
            ).first()
        if row is None:
            raise NotFound(f"no {domain} {kind.value} key {name} v{version}")
        return _record(row)

    def active(self, domain: str, kind: KeyKind, name: str) -> KeyRecord:
        """The newest active version: the one that serves new cards."""
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(keys)
                .where(keys.c.domain == domain, keys.c.kind == kind.value, keys.c.name == name,
                       keys.c.state == KeyState.ACTIVE.value)
                .order_by(keys.c.version.desc())
                .limit(1)
            ).first()
        if row is None:
            if self.versions(domain, kind, name):
                raise InvalidState(f"{domain} {kind.value} key {name} has no active version")
            raise NotFound(f"no {domain} {kind.value} key named {name}")
        return _record(row)

    def states(self, labels: Sequence[str]) -> dict[str, KeyState]:
        """The current state of each labelled key (one query: what a worker checks before each chunk)."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(keys.c.label, keys.c.state).where(keys.c.label.in_(list(labels)))).all()
        return {r.label: KeyState(r.state) for r in rows}

    def versions(self, domain: str, kind: KeyKind, name: str) -> list[KeyRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(keys)
                .where(keys.c.domain == domain, keys.c.kind == kind.value, keys.c.name == name)
                .order_by(keys.c.version)
            ).all()
        return [_record(r) for r in rows]

    def all(self, domain: str | None = None) -> list[KeyRecord]:
        query = sa.select(keys).order_by(keys.c.domain, keys.c.kind, keys.c.name, keys.c.version)
        if domain is not None:
            query = query.where(keys.c.domain == domain)
        with self._engine.connect() as conn:
            return [_record(r) for r in conn.execute(query).all()]

    def names(self, domain: str, kind: KeyKind) -> set[str]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(keys.c.name).where(keys.c.domain == domain, keys.c.kind == kind.value).distinct()
            ).all()
        return {r[0] for r in rows}


def _public_key_detail(public_key: bytes | None) -> dict[str, str]:
    """A public key as audit records show it: its SHA-256 fingerprint."""
    return {} if public_key is None else {"public_key_sha256": hashlib.sha256(public_key).hexdigest()}


def _record(row: sa.Row[tuple[object, ...]]) -> KeyRecord:
    """A row as a record. The token label is derived from the row's domain, kind, name and version (kms.hsm.labels),
    never taken from its ``label`` column: a row changed by another user of the database cannot point a worker at
    another key of its token (a row whose label disagrees is refused)."""
    m = row._mapping
    label = key_label(m["domain"], m["kind"], m["name"], m["version"])
    if m["label"] != label:
        raise InvalidState(f"the key registry row of {label} names another token label ({m['label']}): the "
                           "database was changed outside kms")
    return KeyRecord(
        domain=m["domain"], kind=KeyKind(m["kind"]), name=m["name"], version=m["version"],
        algorithm=m["algorithm"], state=KeyState(m["state"]), label=label, kcv=m["kcv"],
        kcv_method=m["kcv_method"], public_key=m["public_key"], created_at=m["created_at"],
        state_changed_at=m["state_changed_at"],
    )
