"""The tamper-evident audit log: one hash chain of records, HSM-signed checkpoints (docs/audit.md).

Every record is appended **in the same database transaction as the change it describes** (``append(conn, ...)``):
if the record cannot be written the transaction fails, so the change does not happen either (fail closed). A record
holds no key material, PIN or component; card identities appear masked (``mask_pan``).

Chain: record n has the canonical body ``{"seq": n, "at", "kind", "domain", "actor", "subject", "outcome",
"detail"}`` and ``hash_n = SHA-256(hash_{n-1} ‖ SHA-256(body_n))`` with ``hash_0`` = 32 zero bytes. Writers
serialize on the single row of ``audit_head``: the first statement of an append is an UPDATE of that row, which
takes its lock (a row lock on PostgreSQL, the database write lock on SQLite) until the caller's transaction ends, so
any number of processes and replicas keep one linear, gap-free chain.

Checkpoints: ``{"format": "kms-audit-checkpoint", "version": 1, "size": n, "head": hash_n, "at": ...}``, canonical,
signed (ECDSA P-256 over SHA-256) with the audit signing key, held in a token of its own.

Export seals: an export ends with a seal made for that one request, ``{"format": "kms-audit-export-seal",
"version": 1, "size": n, "head": hash_n, "at": ..., "nonce": ..., "filters": {...}}``, canonical, signed with the same
key (the distinct format keeps a seal from passing for a checkpoint and back). It binds the export's end, size and
filters to the nonce the auditor's client chose, so an export cut back to an older checkpoint, or ending with the
seal of another request, no longer verifies (kms.audit.verify). Seals are not stored: they belong to one export.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa

from kms import metrics, store
from kms.canonical import canonical
from kms.clock import Clock, rfc3339
from kms.errors import AuditUnavailable, KmsError, StorageUnavailable
from kms.store import audit_checkpoints, audit_head, audit_log

GENESIS = bytes(32)
CHECKPOINT_FORMAT = "kms-audit-checkpoint"
SEAL_FORMAT = "kms-audit-export-seal"
EXPORT_VERSION = 2  # 2: the export ends with an export seal
#: An export's nonce: 16 to 64 random bytes in lowercase hex (`kms audit export` sends 16, secrets.token_hex).
NONCE = re.compile(r"(?:[0-9a-f]{2}){16,64}")
PAGE = 2_000
CHECKPOINT_LOCK = "audit-checkpoint"  # kms.store.lock_for_transaction: one checkpoint at a time


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    prev: str  # hex
    hash: str  # hex
    body: str  # the canonical JSON that was hashed
    at: str = ""
    kind: str = ""
    domain: str = ""

    def matches(self, since: str | None, until: str | None, domain: str | None, kind: str | None) -> bool:
        return ((since is None or self.at >= since) and (until is None or self.at < until)
                and (domain is None or self.domain == domain)
                and (kind is None or self.kind == kind or self.kind.startswith(kind + ".")))

    def line(self) -> str:
        """The export line (JSON Lines): the body last and verbatim, so a verifier hashes the bytes as written."""
        return f'{{"type":"record","seq":{self.seq},"prev":"{self.prev}","hash":"{self.hash}","body":{self.body}}}'

    def omitted_line(self) -> str:
        """In a filtered export, a record the filter leaves out: only its body's digest, which keeps the chain
        verifiable (and the export complete) without showing the record."""
        digest = hashlib.sha256(self.body.encode()).hexdigest()
        return f'{{"type":"omitted","seq":{self.seq},"prev":"{self.prev}","hash":"{self.hash}","digest":"{digest}"}}'


@dataclass(frozen=True)
class Checkpoint:
    size: int
    head: str  # hex hash of record ``size``
    at: str
    key: str  # the signing key's label
    signature: bytes  # DER ECDSA P-256
    #: The replica whose checkpointer had it signed (``server.replica``; None before issue 13). Not signed: it tells
    #: operators who checkpointed, the signature alone says what was signed (so it is no part of equality either).
    replica: str | None = field(default=None, compare=False)

    def message(self) -> bytes:
        return checkpoint_message(self.size, self.head, self.at)

    def line(self) -> str:
        return json.dumps({"type": "checkpoint", "size": self.size, "head": self.head, "at": self.at,
                           "key": self.key, "signature": self.signature.hex(),
                           **({"replica": self.replica} if self.replica else {})}, separators=(",", ":"))


def checkpoint_message(size: int, head: str, at: str) -> bytes:
    return canonical({"format": CHECKPOINT_FORMAT, "version": 1, "size": size, "head": head, "at": at})


@dataclass(frozen=True)
class Seal:
    """The last line of one export: the chain's head at ``size``, signed for the request's ``nonce`` and filters."""

    size: int
    head: str  # hex hash of record ``size``
    at: str
    nonce: str  # hex, chosen by the auditor's client
    filters: Mapping[str, str]  # the request's filters that are set (since, until, domain, kind)
    key: str
    signature: bytes  # DER ECDSA P-256

    def message(self) -> bytes:
        return seal_message(self.size, self.head, self.at, self.nonce, self.filters)

    def line(self) -> str:
        return json.dumps({"type": "export-seal", "size": self.size, "head": self.head, "at": self.at,
                           "nonce": self.nonce, "filters": dict(self.filters), "key": self.key,
                           "signature": self.signature.hex()}, separators=(",", ":"))


def seal_message(size: int, head: str, at: str, nonce: str, filters: Mapping[str, str]) -> bytes:
    return canonical({"format": SEAL_FORMAT, "version": 1, "size": size, "head": head, "at": at, "nonce": nonce,
                      "filters": dict(filters)})


def chain(prev: bytes, body: bytes) -> bytes:
    """hash_n = SHA-256(hash_{n-1} ‖ SHA-256(body_n)): a record left out of a filtered export still chains by its
    body's digest alone."""
    return hashlib.sha256(prev + hashlib.sha256(body).digest()).digest()


def mask_pan(pan: str | None) -> str:
    """A PAN as audit records show it, its length kept: first 6 and last 4 digits of a PAN of 16 digits or more,
    only the last 4 of a shorter one (6 and 4 of 12 digits would leave 2 hidden, guessable with the Luhn check
    digit), nothing of anything shorter than 12."""
    if not pan:
        return ""
    if len(pan) < 12:
        return "*" * len(pan)
    if len(pan) < 16:
        return "*" * (len(pan) - 4) + pan[-4:]
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


class AuditLog:
    def __init__(self, engine: sa.Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock

    # -- writing -------------------------------------------------------------------------------------------------

    def append(self, conn: sa.Connection, kind: str, *, actor: str = "", domain: str = "", subject: str = "",
               outcome: str = "ok", detail: Mapping[str, Any] | None = None) -> int:
        """Append one record inside the caller's transaction; returns its sequence number. Any failure raises
        AuditUnavailable, and the caller's transaction (and so its change) is rolled back."""
        [seq] = self.append_many(conn, [{"kind": kind, "actor": actor, "domain": domain, "subject": subject,
                                         "outcome": outcome, "detail": detail}])
        return seq

    def append_many(self, conn: sa.Connection, entries: list[dict[str, Any]]) -> list[int]:
        """Append several records (each a dict of ``append``'s keyword arguments plus ``kind``) inside the caller's
        transaction, with one lock of the head and one multi-row insert: what a stream message's cards use."""
        if not entries:
            return []
        started = time.perf_counter()
        try:
            last, prev = _advance(conn, len(entries))
            locked = time.perf_counter()
            at = rfc3339(self._clock.now())
            rows, previous = [], bytes.fromhex(prev)
            for seq, entry in enumerate(entries, start=int(last) - len(entries) + 1):
                body = canonical({"seq": seq, "at": at, "kind": entry["kind"], "domain": entry.get("domain", ""),
                                  "actor": entry.get("actor", ""), "subject": entry.get("subject", ""),
                                  "outcome": entry.get("outcome", "ok"), "detail": dict(entry.get("detail") or {})})
                digest = chain(previous, body)
                rows.append({"seq": seq, "at": at, "kind": entry["kind"], "domain": entry.get("domain", ""),
                             "prev": previous.hex(), "hash": digest.hex(), "body": body.decode()})
                previous = digest
            conn.execute(audit_log.insert(), rows)
            conn.execute(audit_head.update().where(audit_head.c.id == 1).values(hash=previous.hex()))
        except AuditUnavailable:
            raise
        except StorageUnavailable as fault:  # a storage fault (kms.store): the log cannot be written now
            raise _unwritable(fault) from None
        except KmsError:
            raise
        except (sa.exc.SQLAlchemyError, TypeError, ValueError, KeyError):
            raise AuditUnavailable() from None
        # kms_audit_append_seconds, and kms_audit_head_lock_seconds: the head row's lock (waits for other writers)
        metrics.audit_appended(len(rows), time.perf_counter() - started, locked - started)
        return [r["seq"] for r in rows]

    def record(self, kind: str, **fields: Any) -> int:
        """Append a record in a transaction of its own (an outcome that changes nothing else, e.g. a refusal)."""
        try:
            with self._engine.begin() as conn:
                return self.append(conn, kind, **fields)
        except AuditUnavailable:
            raise
        except StorageUnavailable as fault:  # the commit, or the connection, met a storage fault
            raise _unwritable(fault) from None
        except sa.exc.SQLAlchemyError:
            raise AuditUnavailable() from None

    def add_checkpoint(self, checkpoint: Checkpoint, replica: str | None = None) -> Checkpoint:
        """Store a checkpoint, signed at the request of ``replica`` (``server.replica``); if another replica stored
        one of the same size first, that one stands."""
        with self._engine.begin() as conn:
            return _add_checkpoint(conn, checkpoint, replica)

    @contextmanager
    def checkpoint_lock(self) -> Iterator[CheckpointLock]:
        """Checkpoints are signed one at a time by every replica on this database: the audit signer signs only a
        chain that extends the head it signed last, so a replica must read that head, the chain and the newest
        checkpoint, have it signed and store the checkpoint, with no other replica's signing in between. Held for
        the ``with`` block: on PostgreSQL an advisory lock of the block's transaction, on SQLite a file lock beside
        the database (the processes of one host); neither stops appends meanwhile, so a slow signer delays
        checkpoints, never issuance. Within a process, ``Checkpointer``'s own lock comes first."""
        if store.is_postgresql(self._engine):
            with self._engine.begin() as conn:
                store.lock_for_transaction(conn, CHECKPOINT_LOCK)
                yield CheckpointLock(self, conn)
        else:
            with store.sqlite_file_lock(self._engine, CHECKPOINT_LOCK):
                yield CheckpointLock(self, None)

    # -- reading -------------------------------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(size, head hash) of the chain as committed."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)).first()
        return (0, GENESIS.hex()) if row is None else (int(row.seq), str(row.hash))

    def coverage(self) -> tuple[int, int]:
        """(records in the chain, records the newest checkpoint covers), in one transaction: the checkpoint lag
        (kms.metrics)."""
        with self._engine.connect() as conn:
            size = conn.execute(sa.select(audit_head.c.seq).where(audit_head.c.id == 1)).scalar()
            covered = conn.execute(sa.select(sa.func.max(audit_checkpoints.c.size))).scalar()
        return int(size or 0), int(covered or 0)

    def last_checkpoint(self) -> Checkpoint | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(audit_checkpoints).order_by(audit_checkpoints.c.size.desc())
                               .limit(1)).first()
        return None if row is None else _checkpoint(row)

    def records(self, after: int = 0, upto: int | None = None, *, since: str | None = None,
                until: str | None = None, domain: str | None = None, kind: str | None = None
                ) -> Iterator[AuditRecord]:
        """Records in sequence order, page by page (constant memory), optionally filtered."""
        cursor = after
        while True:
            query = sa.select(audit_log).where(audit_log.c.seq > cursor).order_by(audit_log.c.seq).limit(PAGE)
            if upto is not None:
                query = query.where(audit_log.c.seq <= upto)
            if since:
                query = query.where(audit_log.c.at >= since)
            if until:
                query = query.where(audit_log.c.at < until)
            if domain is not None:
                query = query.where(audit_log.c.domain == domain)
            if kind is not None:
                query = query.where((audit_log.c.kind == kind)
                                    | audit_log.c.kind.startswith(kind + ".", autoescape=True))
            with self._engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            for row in rows:
                yield AuditRecord(int(row.seq), row.prev, row.hash, row.body, row.at, row.kind, row.domain)
            cursor = int(rows[-1].seq)

    def checkpoints(self, upto: int | None = None) -> Iterator[Checkpoint]:
        """Checkpoints in size order, page by page (constant memory)."""
        cursor = -1
        while True:
            query = (sa.select(audit_checkpoints).where(audit_checkpoints.c.size > cursor)
                     .order_by(audit_checkpoints.c.size).limit(PAGE))
            if upto is not None:
                query = query.where(audit_checkpoints.c.size <= upto)
            with self._engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            for row in rows:
                yield _checkpoint(row)
            cursor = int(rows[-1].size)


class CheckpointLock:
    """What ``AuditLog.checkpoint_lock`` yields: the newest checkpoint and the head read, and a checkpoint stored,
    under the lock (PostgreSQL: in the lock's transaction; SQLite: each in a transaction of its own)."""

    def __init__(self, log: AuditLog, conn: sa.Connection | None) -> None:
        self._log = log
        self._conn = conn

    def last_checkpoint(self) -> Checkpoint | None:
        if self._conn is None:
            return self._log.last_checkpoint()
        row = self._conn.execute(sa.select(audit_checkpoints).order_by(audit_checkpoints.c.size.desc())
                                 .limit(1)).first()
        return None if row is None else _checkpoint(row)

    def head(self) -> tuple[int, str]:
        if self._conn is None:
            return self._log.head()
        row = self._conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)).first()
        return (0, GENESIS.hex()) if row is None else (int(row.seq), str(row.hash))

    def add_checkpoint(self, checkpoint: Checkpoint, replica: str | None = None) -> Checkpoint:
        if self._conn is None:
            return self._log.add_checkpoint(checkpoint, replica)
        return _add_checkpoint(self._conn, checkpoint, replica)


def _add_checkpoint(conn: sa.Connection, checkpoint: Checkpoint, replica: str | None) -> Checkpoint:
    try:
        with conn.begin_nested():
            conn.execute(audit_checkpoints.insert().values(
                size=checkpoint.size, head=checkpoint.head, at=checkpoint.at, key=checkpoint.key,
                signature=checkpoint.signature, replica=replica))
    except sa.exc.IntegrityError:  # a replica that takes no lock (an older kms) stored this size first
        row = conn.execute(sa.select(audit_checkpoints).where(audit_checkpoints.c.size == checkpoint.size)).one()
        return _checkpoint(row)
    return replace(checkpoint, replica=replica)


def _unwritable(fault: StorageUnavailable) -> AuditUnavailable:
    """AuditUnavailable for a storage fault, naming it: "the audit log cannot be written (disk full); nothing was
    done"."""
    return AuditUnavailable(f"the audit log cannot be written ({fault.reason}); nothing was done", reason=fault.reason)


def _advance(conn: sa.Connection, count: int) -> tuple[int, str]:
    """Lock the chain's head and move it on by ``count`` records: (the last new sequence number, the previous hash).
    One statement takes the lock and reads the head (UPDATE ... RETURNING: PostgreSQL, SQLite 3.35+). On a new
    database the head row is created first; of writers racing to create it, all but one find it made."""
    update = (audit_head.update().where(audit_head.c.id == 1).values(seq=audit_head.c.seq + count)
              .returning(audit_head.c.seq, audit_head.c.hash))
    row = conn.execute(update).first()
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(audit_head.insert().values(id=1, seq=0, hash=GENESIS.hex()))
        except sa.exc.IntegrityError:
            pass
        row = conn.execute(update).one()
    return int(row[0]), str(row[1])


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(int(row.size), row.head, row.at, row.key, bytes(row.signature), row.replica)


def export_lines(log: AuditLog, seal: Seal) -> Iterator[str]:
    """An export as JSON Lines: a header, then the records up to the seal's size in order, each checkpoint right after
    the record it covers, and the seal last. With a filter (the seal's), a record the filter leaves out appears only
    as an ``omitted`` line (its body's digest), so a filtered export is as complete and verifiable as a full one,
    without showing the rest. The header repeats the seal's size, nonce and filters (the verifier holds it to them)."""
    filters = dict(seal.filters)
    since, until, domain, kind = (filters.get(k) for k in ("since", "until", "domain", "kind"))
    yield json.dumps({"type": "export", "format": "kms-audit-export", "version": EXPORT_VERSION, "size": seal.size,
                      "nonce": seal.nonce, "filtered": bool(filters), "filters": filters}, separators=(",", ":"))
    checkpoints = iter(log.checkpoints(seal.size))
    upcoming = next(checkpoints, None)
    for record in log.records(0, seal.size):
        while upcoming is not None and upcoming.size < record.seq:
            yield upcoming.line()
            upcoming = next(checkpoints, None)
        yield record.line() if record.matches(since, until, domain, kind) else record.omitted_line()
    while upcoming is not None:
        yield upcoming.line()
        upcoming = next(checkpoints, None)
    yield seal.line()
