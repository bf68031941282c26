"""Ceremonies, persisted: propose → approve (signed) → components → execute once → minutes; cancel; expiry.

The rules of who counts are in kms.ceremony.rules (``evaluate``); this module stores ceremonies and applies those rules
at every step. Each state change is one conditional UPDATE or INSERT whose WHERE clause or key states what it assumed,
so two service replicas cannot both execute a ceremony, and an officer cannot approve twice.

States: ``open`` → ``executing`` → ``executed`` | ``failed``; ``open`` → ``cancelled`` | ``expired``. An open
ceremony past its expiry time reads as ``expired`` and accepts nothing more; ``sweep`` records it so and erases its
encrypted components, and fails executions interrupted for longer than EXECUTION_TIMEOUT.

With an audit log (kms.audit.log) each step appends its record in the transaction of its change (fail closed), and only
once the change happened: ``ceremony.proposed`` (operation, digest, parameters with public keys as fingerprints),
``ceremony.approved``, ``ceremony.component`` (custodian and KCV only), ``ceremony.components-out`` (escrow: per
recipient the KCV), ``ceremony.cancelled``, ``ceremony.executing``, ``ceremony.executed`` / ``ceremony.failed``
(result or error), ``ceremony.expired`` and ``ceremony.interrupted`` (by a sweep).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kms import store
from kms.audit.log import AuditLog
from kms.canonical import canonical
from kms.ceremony.officers import OfficerStore
from kms.ceremony.rules import Approval, Proposal, QuorumPolicy, evaluate
from kms.clock import Clock, rfc3339
from kms.errors import AlreadyExists, InvalidArgument, InvalidState, KmsError, NotFound, PermissionDenied
from kms.identity import Principal, parse_uri
from kms.repository import Repository
from kms.store import ceremonies, ceremony_approvals, ceremony_components

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=7)
MAX_SEALED_COMPONENT = 2048
#: On SQLite, an execution still running after this long is taken to be interrupted (its replica died); PostgreSQL
#: knows (Ceremonies._execution).
EXECUTION_TIMEOUT = dt.timedelta(minutes=15)
INTERRUPTED = "interrupted while executing; check the key registry against the token"
_ID = re.compile(r"^C-[0-9a-f]{16}$")
_KCV = re.compile(r"^[0-9A-F]{6}$")


class CeremonyState(enum.StrEnum):
    OPEN = "open"
    EXECUTING = "executing"
    EXECUTED = "executed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # open past expires_at (read as expired at once; stored so by the next sweep)


@dataclass(frozen=True)
class ApprovalRecord:
    officer: Principal
    signature: bytes
    at: str


@dataclass(frozen=True)
class ComponentRecord:
    custodian: Principal
    kcv: str
    at: str


@dataclass(frozen=True)
class CeremonyRecord:
    ceremony_id: str
    proposal: Proposal
    encoding: bytes
    digest: str
    state: CeremonyState
    approvals: tuple[ApprovalRecord, ...]
    components: tuple[ComponentRecord, ...]  # received for import (custodian and KCV only)
    result: Mapping[str, Any] | None
    error: str | None
    closed_at: str | None
    closed_by: str | None

    @property
    def domain(self) -> str:
        return self.proposal.domain

    @property
    def operation(self) -> str:
        return self.proposal.operation

    @property
    def params(self) -> Mapping[str, Any]:
        return self.proposal.params

    def custodians(self) -> tuple[str, ...]:
        """The officers (names) who each send in one component; the ceremony runs only once all have."""
        value = self.params.get("custodians", [])
        return tuple(value) if isinstance(value, list) else ()


def check_id(ceremony_id: str) -> str:
    if not _ID.fullmatch(ceremony_id):
        raise InvalidArgument("ceremony_id", "must be C- followed by 16 hexadecimal digits")
    return ceremony_id


def check_kcv(kcv: str, field: str = "kcv") -> str:
    value = kcv.strip().upper()
    if not kcv.isascii() or not _KCV.fullmatch(value):  # "ﬀ".upper() is "FF"
        raise InvalidArgument(field, "must be 6 hexadecimal digits (3 bytes)")
    return value


class Ceremonies(Repository):
    """The ceremony protocol over the database: what the ceremony service and the genesis call."""

    def __init__(self, engine: sa.Engine, clock: Clock, policy: QuorumPolicy, officer_store: OfficerStore,
                 audit: AuditLog | None = None) -> None:
        super().__init__(engine, clock, audit)
        self.policy = policy
        self.officers = officer_store

    # -- propose, approve, components, cancel ----------------------------------------------------------------

    def propose(self, proposer: Principal, operation: str, params: Mapping[str, Any],
                ttl: dt.timedelta = DEFAULT_TTL, *, quorum_required: bool = True) -> CeremonyRecord:
        """Record a proposal by an enrolled officer of its domain. ``params`` must already be checked for the
        operation (kms.ceremony.operations). Without a quorum rule for the operation nothing is recorded (default
        deny)."""
        if not dt.timedelta(minutes=1) <= ttl <= MAX_TTL:
            raise InvalidArgument("ttl_seconds", f"must be between 60 and {int(MAX_TTL.total_seconds())}")
        if proposer.role != "officer" or proposer.domain is None:
            raise PermissionDenied("only officers propose ceremonies")
        if quorum_required:
            self.policy.quorum(proposer.domain, operation)
            self._enrolled(proposer)
        self.sweep()
        now = self._clock.now().replace(microsecond=0)
        ceremony_id = f"C-{secrets.token_hex(8)}"
        proposal = Proposal(proposer.domain, operation, dict(params), proposer, now, now + ttl, ceremony_id)
        encoding = proposal.encoding()
        with self._engine.begin() as conn:
            conn.execute(ceremonies.insert().values(
                ceremony_id=ceremony_id, domain=proposal.domain, operation=operation, proposer=proposer.uri(),
                created_at=rfc3339(proposal.created_at), expires_at=rfc3339(proposal.expires_at),
                encoding=encoding, digest=proposal.digest.hex(), state=CeremonyState.OPEN.value,
            ))
            if self._audit is not None:
                self._audit.append(conn, "ceremony.proposed", actor=proposer.uri(), domain=proposal.domain,
                                   subject=ceremony_id, detail={
                                       "operation": operation, "digest": proposal.digest.hex(),
                                       "expires_at": rfc3339(proposal.expires_at), "params": _audit_params(params)})
        return self.get(ceremony_id)

    def approve(self, ceremony_id: str, officer: Principal, signature: bytes) -> CeremonyRecord:
        """Record an officer's signed approval, refused with the reason unless it would count."""
        record = self._open(ceremony_id)
        enrolled = self._enrolled(officer)
        if officer.domain != record.domain:
            raise PermissionDenied(f"{officer} cannot approve a ceremony of the {record.domain} domain")
        single = evaluate(record.proposal, [Approval(officer, signature)], {officer: enrolled.officer},
                          self.policy, self._clock.now())
        if single.refused:
            reason = single.refused[0][1]
            if reason == "the signature is not over this proposal":
                raise InvalidArgument("signature", f"does not verify under {officer}'s approval key for this "
                                                   f"ceremony's digest {record.digest}")
            raise PermissionDenied(f"{officer} cannot approve {ceremony_id}: {reason}")
        try:
            with self._engine.begin() as conn:
                self._still_open(conn, ceremony_id)
                conn.execute(ceremony_approvals.insert().values(
                    ceremony_id=ceremony_id, officer=officer.uri(), signature=signature,
                    at=rfc3339(self._clock.now())))
                if self._audit is not None:
                    self._audit.append(conn, "ceremony.approved", actor=officer.uri(), domain=record.domain,
                                       subject=ceremony_id, detail={"operation": record.operation,
                                                                    "digest": record.digest})
        except sa.exc.IntegrityError:
            raise AlreadyExists(f"{officer} has already approved {ceremony_id}") from None
        return self.get(ceremony_id)

    def add_component(self, ceremony_id: str, custodian: Principal, sealed: bytes, kcv: str,
                      check: Callable[[CeremonyRecord, bytes, str], None] | None = None) -> CeremonyRecord:
        """Store a custodian's component, encrypted to the domain's custody key, with its KCV. ``check`` (the
        domain worker) decrypts it and compares the KCV before anything is stored."""
        record = self._open(ceremony_id)
        kcv = check_kcv(kcv)
        if custodian.role != "officer" or custodian.domain != record.domain:
            raise PermissionDenied(f"{custodian} is not an officer of the {record.domain} domain")
        if custodian.name not in record.custodians():
            raise PermissionDenied(f"{custodian} is not a custodian named in {ceremony_id}")
        if "key-custodian" not in self._enrolled(custodian).officer.roles:
            raise PermissionDenied(f"{custodian} lacks the key-custodian role")
        if not 0 < len(sealed) <= MAX_SEALED_COMPONENT:
            raise InvalidArgument("encrypted_component", f"must be 1 to {MAX_SEALED_COMPONENT} bytes")
        if any(c.custodian == custodian for c in record.components):
            raise AlreadyExists(f"{custodian} has already submitted a component to {ceremony_id}")
        if check is not None:
            check(record, sealed, kcv)
        try:
            with self._engine.begin() as conn:
                self._still_open(conn, ceremony_id)
                conn.execute(ceremony_components.insert().values(
                    ceremony_id=ceremony_id, custodian=custodian.uri(), direction="in", sealed=sealed, kcv=kcv,
                    at=rfc3339(self._clock.now())))
                if self._audit is not None:  # who and the KCV: never the component, not even encrypted
                    self._audit.append(conn, "ceremony.component", actor=custodian.uri(), domain=record.domain,
                                       subject=ceremony_id, detail={"custodian": custodian.uri(), "kcv": kcv})
        except sa.exc.IntegrityError:
            raise AlreadyExists(f"{custodian} has already submitted a component to {ceremony_id}") from None
        return self.get(ceremony_id)

    def sealed_components(self, ceremony_id: str, direction: str = "in") -> list[tuple[Principal, bytes, str]]:
        """(custodian, sealed component, KCV) in custodian order."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(ceremony_components).where(
                ceremony_components.c.ceremony_id == ceremony_id, ceremony_components.c.direction == direction,
            ).order_by(ceremony_components.c.custodian)).all()
        return [(parse_uri(r.custodian), bytes(r.sealed), r.kcv) for r in rows]

    def store_outputs(self, ceremony_id: str, outputs: Sequence[tuple[Principal, bytes, str]]) -> None:
        """Components for custodians (escrow export), each encrypted to its custodian's approval key."""
        now = rfc3339(self._clock.now())
        with self._engine.begin() as conn:
            conn.execute(ceremony_components.insert(), [
                {"ceremony_id": ceremony_id, "custodian": who.uri(), "direction": "out", "sealed": sealed,
                 "kcv": kcv, "at": now} for who, sealed, kcv in outputs])
            if self._audit is not None:
                domain = conn.execute(sa.select(ceremonies.c.domain).where(
                    ceremonies.c.ceremony_id == ceremony_id)).scalar()
                self._audit.append(conn, "ceremony.components-out", domain=domain or "", subject=ceremony_id,
                                   detail={"components": [{"custodian": who.uri(), "kcv": kcv}
                                                          for who, _, kcv in outputs]})

    def output_for(self, ceremony_id: str, custodian: Principal) -> tuple[bytes, str]:
        for who, sealed, kcv in self.sealed_components(check_id(ceremony_id), "out"):
            if who == custodian:
                return sealed, kcv
        raise NotFound(f"{ceremony_id} holds no component for {custodian}")

    def cancel(self, ceremony_id: str, by: Principal) -> CeremonyRecord:
        record = self._open(ceremony_id)
        if by.role != "officer" or by.domain != record.domain:
            raise PermissionDenied(f"{by} cannot cancel a ceremony of the {record.domain} domain")
        self._enrolled(by)
        self._close(record, CeremonyState.OPEN, CeremonyState.CANCELLED, by)
        self._drop_inputs(ceremony_id)
        return self.get(ceremony_id)

    # -- execute -----------------------------------------------------------------------------------------------

    def execute(self, ceremony_id: str, by: Principal,
                run: Callable[[CeremonyRecord], Mapping[str, Any]]) -> CeremonyRecord:
        """Run the operation once, if the stored approvals meet the quorum now and every named custodian's
        component is in. ``run`` does the work (in the domain worker) and returns the result for the minutes."""
        record = self._open(ceremony_id)
        if by.role != "officer" or by.domain != record.domain:
            raise PermissionDenied(f"{by} cannot execute a ceremony of the {record.domain} domain")
        self._enrolled(by)
        decision = evaluate(record.proposal, [Approval(a.officer, a.signature) for a in record.approvals],
                            self.officers.active(record.domain), self.policy, self._clock.now())
        if not decision.met:
            why = "; ".join(f"{who}: {reason}" for who, reason in decision.refused)
            raise InvalidState(f"{ceremony_id} has {len(decision.counted)} of the {decision.required} approvals "
                               f"it needs" + (f" ({why})" if why else ""))
        missing = sorted(set(record.custodians()) - {c.custodian.name for c in record.components})
        if missing:
            raise InvalidState(f"{ceremony_id} still needs the components of {', '.join(missing)}")
        with self._execution(ceremony_id):
            self._close(record, CeremonyState.OPEN, CeremonyState.EXECUTING, by)
            # The approvals that counted, as they stood when execution began (a late insert cannot join: approvals
            # and components are accepted only while the ceremony is open).
            counted = {"approved_by": [p.uri() for p in decision.counted], "required": decision.required}
            try:
                result = dict(run(self.get(ceremony_id)))
                canonical({**result, **counted})  # storable, or the ceremony fails here rather than stay executing
            except KmsError as error:
                self._finish(record, CeremonyState.FAILED, counted, str(error), by)
                raise
            except BaseException:
                self._finish(record, CeremonyState.FAILED, counted, "internal error; see the server log", by)
                raise
            self._finish(record, CeremonyState.EXECUTED, {**result, **counted}, None, by)
        return self.get(ceremony_id)

    @contextmanager
    def _execution(self, ceremony_id: str) -> Iterator[None]:
        """Held while this replica executes ``ceremony_id`` (PostgreSQL: an advisory lock of a session of its own,
        which ends with the replica or its connection): what tells another replica's ``sweep`` that the execution
        is alive. SQLite, one host's database, has no such lock: ``sweep`` goes by EXECUTION_TIMEOUT there."""
        if not store.is_postgresql(self._engine):
            yield
            return
        with self._engine.connect() as conn:
            # A connection that may still hold the session lock never goes back to the pool (a rollback at checkin
            # does not end a session lock): any failure here invalidates it, which ends its session and the lock.
            try:
                store.keep_session(conn)  # no server idle timeout ends the lock while the operation runs
                held = store.try_lock(conn, _execution_lock(ceremony_id))
                conn.commit()  # the lock is the session's: no transaction stays open while the operation runs
            except BaseException:
                conn.invalidate()
                raise
            if not held:  # another replica's execution (or its sweep, for a moment) holds it
                raise InvalidState(f"{ceremony_id} is being executed")
            try:
                yield
            finally:
                try:
                    store.unlock(conn, _execution_lock(ceremony_id))
                    conn.commit()
                except BaseException as error:
                    conn.invalidate()  # the connection is lost (and the lock with it), or it is ended here
                    if not isinstance(error, KmsError):
                        raise

    def sweep(self, stuck_after: dt.timedelta = EXECUTION_TIMEOUT) -> None:
        """Close what time has ended: open ceremonies past their expiry become ``expired`` (their encrypted
        components erased), and ceremonies ``executing`` whose execution ended with its replica mid-way become
        ``failed``, for officers to check the key registry against the token. Which executions ended: on
        PostgreSQL, those whose replica no longer holds the execution's lock (``_execution``: a live replica's
        execution is never failed, however long it runs; a dead one's at once); on SQLite, those executing for
        longer than ``stuck_after``. Each ceremony is closed in a transaction of its own by a conditional UPDATE,
        so that exactly the ceremonies this sweep closed are recorded (another replica's sweep may close some of
        them first), and no sweep holds more than one ceremony's row."""
        now = self._clock.now()
        locks = store.is_postgresql(self._engine)
        is_expired = (ceremonies.c.state == CeremonyState.OPEN.value) & (ceremonies.c.expires_at <= rfc3339(now))
        is_stuck = (ceremonies.c.state == CeremonyState.EXECUTING.value)
        if not locks:
            is_stuck = is_stuck & (ceremonies.c.closed_at <= rfc3339(now - stuck_after))
        columns = (ceremonies.c.ceremony_id, ceremonies.c.domain, ceremonies.c.operation, ceremonies.c.expires_at,
                   ceremonies.c.closed_at)
        with self._engine.connect() as conn:
            expired = conn.execute(sa.select(*columns).where(is_expired).order_by(ceremonies.c.ceremony_id)).all()
            stuck = conn.execute(sa.select(*columns).where(is_stuck).order_by(ceremonies.c.ceremony_id)).all()
        for row in expired:
            with self._engine.begin() as conn:
                if conn.execute(ceremonies.update().where(ceremonies.c.ceremony_id == row.ceremony_id, is_expired)
                                .values(state=CeremonyState.EXPIRED.value, closed_at=ceremonies.c.expires_at)
                                ).rowcount != 1:
                    continue
                _erase_inputs(conn, [row.ceremony_id])
                if self._audit is not None:
                    self._audit.append(conn, "ceremony.expired", domain=row.domain, subject=row.ceremony_id,
                                       detail={"operation": row.operation, "expired_at": row.expires_at})
        for row in stuck:
            with self._engine.begin() as conn:
                if locks and not store.try_lock_for_transaction(conn, _execution_lock(row.ceremony_id)):
                    continue  # its replica is executing it now
                if conn.execute(ceremonies.update().where(ceremonies.c.ceremony_id == row.ceremony_id, is_stuck)
                                .values(state=CeremonyState.FAILED.value, error=INTERRUPTED)).rowcount != 1:
                    continue
                if self._audit is not None:
                    self._audit.append(conn, "ceremony.interrupted", domain=row.domain, subject=row.ceremony_id,
                                       outcome="failed", detail={"operation": row.operation, "error": INTERRUPTED,
                                                                 "executing_since": row.closed_at})

    def record_executed(self, proposal_record: CeremonyRecord, result: Mapping[str, Any],
                        by: Principal) -> CeremonyRecord:
        """Close a ceremony that needs no quorum (the genesis) as executed."""
        with self._execution(proposal_record.ceremony_id):
            self._close(proposal_record, CeremonyState.OPEN, CeremonyState.EXECUTING, by)
            self._finish(proposal_record, CeremonyState.EXECUTED, result, None, by)
        return self.get(proposal_record.ceremony_id)

    def add_genesis_signature(self, ceremony_id: str, officer: Principal, signature: bytes) -> None:
        with self._engine.begin() as conn:
            conn.execute(ceremony_approvals.insert().values(
                ceremony_id=ceremony_id, officer=officer.uri(), signature=signature, at=rfc3339(self._clock.now())))
            if self._audit is not None:
                row = conn.execute(sa.select(ceremonies.c.domain, ceremonies.c.operation, ceremonies.c.digest).where(
                    ceremonies.c.ceremony_id == ceremony_id)).one()
                self._audit.append(conn, "ceremony.approved", actor=officer.uri(), domain=row.domain,
                                   subject=ceremony_id, detail={"operation": row.operation, "digest": row.digest})

    # -- reading -----------------------------------------------------------------------------------------------

    def get(self, ceremony_id: str) -> CeremonyRecord:
        check_id(ceremony_id)
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(ceremonies).where(ceremonies.c.ceremony_id == ceremony_id)).first()
            if row is None:
                raise NotFound(f"no ceremony {ceremony_id}")
            approvals = conn.execute(sa.select(ceremony_approvals).where(
                ceremony_approvals.c.ceremony_id == ceremony_id).order_by(ceremony_approvals.c.at,
                                                                          ceremony_approvals.c.officer)).all()
            components = conn.execute(sa.select(
                ceremony_components.c.custodian, ceremony_components.c.kcv, ceremony_components.c.at).where(
                ceremony_components.c.ceremony_id == ceremony_id, ceremony_components.c.direction == "in",
            ).order_by(ceremony_components.c.at, ceremony_components.c.custodian)).all()
        return self._record(row._mapping, approvals, components)

    def counts(self) -> dict[tuple[str, str], int]:
        """{(domain, state): ceremonies} as stored (kms.metrics, when scraped; one indexed query)."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(ceremonies.c.domain, ceremonies.c.state, sa.func.count())
                                .group_by(ceremonies.c.domain, ceremonies.c.state)).all()
        return {(str(domain), str(state)): int(count) for domain, state, count in rows}

    def list(self, domain: str, states: Sequence[CeremonyState] = ()) -> list[CeremonyRecord]:
        with self._engine.connect() as conn:
            ids = conn.execute(sa.select(ceremonies.c.ceremony_id).where(ceremonies.c.domain == domain)
                               .order_by(ceremonies.c.created_at, ceremonies.c.ceremony_id)).scalars().all()
        found = [self.get(i) for i in ids]
        return [r for r in found if not states or r.state in states]

    def _record(self, m: Mapping[Any, Any], approvals: Sequence[Any], components: Sequence[Any]) -> CeremonyRecord:
        doc = json.loads(bytes(m["encoding"]))
        proposal = Proposal(doc["domain"], doc["operation"], doc["params"], parse_uri(doc["proposer"]),
                            _parse_time(doc["created_at"]), _parse_time(doc["expires_at"]), doc["ceremony_id"])
        state = CeremonyState(m["state"])
        if state is CeremonyState.OPEN and self._clock.now() >= proposal.expires_at:
            state = CeremonyState.EXPIRED
        return CeremonyRecord(
            ceremony_id=m["ceremony_id"], proposal=proposal, encoding=bytes(m["encoding"]), digest=m["digest"],
            state=state,
            approvals=tuple(ApprovalRecord(parse_uri(a.officer), bytes(a.signature), a.at) for a in approvals),
            components=tuple(ComponentRecord(parse_uri(c.custodian), c.kcv, c.at) for c in components),
            result=None if m["result"] is None else json.loads(m["result"]), error=m["error"],
            closed_at=m["closed_at"], closed_by=m["closed_by"],
        )

    # -- internals ---------------------------------------------------------------------------------------------

    def _enrolled(self, officer: Principal) -> Any:
        try:
            record = self.officers.get(officer)
        except NotFound:
            raise PermissionDenied(f"{officer} is not an enrolled officer") from None
        if record.state != "active":
            raise PermissionDenied(f"{officer} is not an active officer")
        return record

    def _open(self, ceremony_id: str) -> CeremonyRecord:
        self.sweep()
        record = self.get(ceremony_id)
        if record.state is not CeremonyState.OPEN:
            raise InvalidState(f"{ceremony_id} is {record.state.value}")
        return record

    def _close(self, record: CeremonyRecord, expected: CeremonyState, to: CeremonyState, by: Principal) -> None:
        ceremony_id = record.ceremony_id
        now = self._clock.now()
        with self._engine.begin() as conn:
            changed = conn.execute(ceremonies.update().where(
                ceremonies.c.ceremony_id == ceremony_id, ceremonies.c.state == expected.value,
                ceremonies.c.expires_at > rfc3339(now),
            ).values(state=to.value, closed_at=rfc3339(now), closed_by=by.uri())).rowcount
            if changed == 1 and self._audit is not None:
                self._audit.append(conn, f"ceremony.{to.value}", actor=by.uri(), domain=record.domain,
                                   subject=ceremony_id, detail={"operation": record.operation})
        if changed != 1:
            raise InvalidState(f"{ceremony_id} is {self.get(ceremony_id).state.value}")

    def _finish(self, record: CeremonyRecord, state: CeremonyState, result: Mapping[str, Any] | None,
                error: str | None, by: Principal) -> None:
        # Executing, or swept as interrupted by another replica while it was in fact still running: the outcome
        # is recorded either way.
        ceremony_id = record.ceremony_id
        with self._engine.begin() as conn:
            changed = conn.execute(ceremonies.update().where(
                ceremonies.c.ceremony_id == ceremony_id,
                (ceremonies.c.state == CeremonyState.EXECUTING.value)
                | ((ceremonies.c.state == CeremonyState.FAILED.value) & (ceremonies.c.error == INTERRUPTED)),
            ).values(state=state.value, result=None if result is None else canonical(dict(result)).decode(),
                     error=error, closed_at=rfc3339(self._clock.now()))).rowcount
            if changed == 1 and self._audit is not None:
                self._audit.append(conn, f"ceremony.{state.value}", actor=by.uri(), domain=record.domain,
                                   subject=ceremony_id, outcome="ok" if state is CeremonyState.EXECUTED else "failed",
                                   detail={"operation": record.operation, "result": _audit_params(dict(result or {})),
                                           "error": error or ""})
        self._drop_inputs(ceremony_id)

    def _drop_inputs(self, ceremony_id: str) -> None:
        with self._engine.begin() as conn:
            _erase_inputs(conn, [ceremony_id])

    def _still_open(self, conn: sa.Connection, ceremony_id: str) -> None:
        """Inside a transaction: lock the ceremony's row, conditional on it being open and unexpired, so that an
        approval or component cannot land after execution began, or after a cancel."""
        changed = conn.execute(ceremonies.update().where(
            ceremonies.c.ceremony_id == ceremony_id, ceremonies.c.state == CeremonyState.OPEN.value,
            ceremonies.c.expires_at > rfc3339(self._clock.now()),
        ).values(state=CeremonyState.OPEN.value)).rowcount
        if changed != 1:
            raise InvalidState(f"{ceremony_id} is no longer open")


def _audit_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A proposal's parameters (and an execution's result) as audit records show them: public keys (PEM) as their
    SHA-256 fingerprints, at any depth (the genesis lists officers with their keys)."""
    def shown(name: str, value: Any) -> Any:
        if "public_key" in name and isinstance(value, str):
            return f"sha256:{hashlib.sha256(value.encode()).hexdigest()}"
        if isinstance(value, Mapping):
            return {k: shown(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [shown(name, v) for v in value]
        return value
    return {name: shown(name, value) for name, value in params.items()}


def _execution_lock(ceremony_id: str) -> str:
    """The name of the lock a replica holds while it executes the ceremony (kms.store.try_lock)."""
    return f"ceremony-execution:{ceremony_id}"


def _erase_inputs(conn: sa.Connection, ceremony_ids: Sequence[str]) -> None:
    """Encrypted components sent in for import are erased when the ceremony ends (custodians and KCVs stay)."""
    conn.execute(ceremony_components.update().where(
        ceremony_components.c.ceremony_id.in_(ceremony_ids), ceremony_components.c.direction == "in",
    ).values(sealed=b""))


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
