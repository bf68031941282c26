"""The record store: SQLAlchemy 2 Core tables, SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy import event

from kms.errors import ConfigError, StorageUnavailable, Unavailable
from kms.files import create_private

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)
# Alembic says at INFO which dialect it found each time a status is read; kms logs what it changes itself.
logging.getLogger("alembic").setLevel(logging.WARNING)

metadata = sa.MetaData()

#: Every key kms manages in a token, by domain, kind, name and version. The token object's label is derived from
#: these; the state column follows NIST SP 800-57 (transitions are enforced by kms.registry).
keys = sa.Table(
    "keys",
    metadata,
    sa.Column("domain", sa.String(16), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),  # master | transport | signing
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("label", sa.String(160), nullable=False, unique=True),
    sa.Column("kcv", sa.String(16), nullable=True),
    sa.Column("kcv_method", sa.String(32), nullable=True),
    sa.Column("public_key", sa.LargeBinary, nullable=True),  # SPKI DER for signing keys
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("state_changed_at", sa.String(32), nullable=False),
)

#: Security officers: who may propose and approve ceremonies of their domain, with their approval public keys.
officers = sa.Table(
    "officers",
    metadata,
    sa.Column("principal", sa.String(200), primary_key=True),  # urn:kms:officer:<domain>:<name>
    sa.Column("domain", sa.String(16), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("roles", sa.String(200), nullable=False),  # space-separated
    sa.Column("public_key", sa.Text, nullable=False),  # SPKI PEM of the ECDSA P-256 approval key
    sa.Column("state", sa.String(16), nullable=False),  # active | revoked
    sa.Column("enrolled_at", sa.String(32), nullable=False),
    sa.Column("enrolled_by", sa.String(64), nullable=False),  # the ceremony id (genesis or enrol-officer)
    # SHA-256 (hex) of the SubjectPublicKeyInfo of the officer's mTLS client certificate: the one certificate key
    # accepted for this officer (kms.principals); another certificate for the same URI is refused.
    sa.Column("cert_sha256", sa.String(64), nullable=False),
)

#: Stations and auditors as each key domain registered them (kms.principals): a row per principal and domain,
#: made by that domain's ceremony (register-station, enrol-auditor; the development home's genesis), pinned to
#: the certificate key that domain approved. A principal acts for a domain only while its row is active and the
#: caller's certificate key is the pinned one.
principal_grants = sa.Table(
    "principal_grants",
    metadata,
    sa.Column("principal", sa.String(200), primary_key=True),  # a station or auditor URI
    sa.Column("domain", sa.String(16), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),  # station | auditor
    sa.Column("cert_sha256", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # active | revoked
    sa.Column("ceremony_id", sa.String(64), nullable=False),  # the ceremony that made the row's current state
    sa.Column("changed_at", sa.String(32), nullable=False),
)

#: Ceremonies: a proposed operation of one domain, its canonical encoding and digest, and how it ended.
ceremonies = sa.Table(
    "ceremonies",
    metadata,
    sa.Column("ceremony_id", sa.String(64), primary_key=True),
    sa.Column("domain", sa.String(16), nullable=False),
    sa.Column("operation", sa.String(64), nullable=False),
    sa.Column("proposer", sa.String(200), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.String(32), nullable=False),
    sa.Column("encoding", sa.LargeBinary, nullable=False),  # canonical proposal: what approvals sign (digest)
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # open | executing | executed | failed | cancelled
    sa.Column("result", sa.Text, nullable=True),  # canonical JSON: labels, versions, KCVs; never key material
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("closed_at", sa.String(32), nullable=True),
    sa.Column("closed_by", sa.String(200), nullable=True),
    sa.Index("ix_ceremonies_domain_state", "domain", "state"),
)

#: One officer's signed approval of one ceremony (at most one per officer).
ceremony_approvals = sa.Table(
    "ceremony_approvals",
    metadata,
    sa.Column("ceremony_id", sa.String(64), sa.ForeignKey("ceremonies.ceremony_id"), primary_key=True),
    sa.Column("officer", sa.String(200), primary_key=True),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("at", sa.String(32), nullable=False),
)

#: Key components in transit: a custodian's component encrypted to the domain's custody key (import), or to the
#: custodian's approval key (export). ``direction`` says which; import rows are deleted when the ceremony ends.
ceremony_components = sa.Table(
    "ceremony_components",
    metadata,
    sa.Column("ceremony_id", sa.String(64), sa.ForeignKey("ceremonies.ceremony_id"), primary_key=True),
    sa.Column("custodian", sa.String(200), primary_key=True),
    sa.Column("direction", sa.String(8), primary_key=True),  # in | out
    sa.Column("sealed", sa.LargeBinary, nullable=False),
    sa.Column("kcv", sa.String(16), nullable=False),
    sa.Column("at", sa.String(32), nullable=False),
)

#: A batch's authorization by one domain (the executed authorize-batch ceremony).
batch_authorizations = sa.Table(
    "batch_authorizations",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.batch_id"), primary_key=True),
    sa.Column("domain", sa.String(16), primary_key=True),
    sa.Column("ceremony_id", sa.String(64), nullable=False),
    sa.Column("key_versions", sa.Text, nullable=False),  # canonical JSON {master key name: version} approved
    sa.Column("at", sa.String(32), nullable=False),
)

#: A bureau station's transport key handed over wrapped under that station's RSA key (register-transport-key,
#: method rsa-oaep): kept until the station confirms the KCV, then erased; the key is active only from then on.
transport_handoffs = sa.Table(
    "transport_handoffs",
    metadata,
    sa.Column("domain", sa.String(16), primary_key=True),
    sa.Column("bureau", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("station", sa.String(200), nullable=False),  # the one station principal that may fetch it
    sa.Column("wrapped", sa.LargeBinary, nullable=False),  # RSA-OAEP under the station's key; erased on acceptance
    sa.Column("kcv", sa.String(16), nullable=False),
    sa.Column("ceremony_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("accepted_at", sa.String(32), nullable=True),
)

#: One key domain's consent to an action on a card that touches every domain's keys or applications
#: (kms.issuance.consents): re-issuing a card (``reissue``, subject ``<batch_id>/<card_ref>``) or replacing one
#: (``replace``, subject ``<old card_ref>><new card_ref>``). The action runs once every domain it needs has consented;
#: the rows are then deleted. A consent older than its ``expires_at`` no longer counts.
consents = sa.Table(
    "consents",
    metadata,
    sa.Column("action", sa.String(16), primary_key=True),
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("domain", sa.String(16), primary_key=True),
    sa.Column("by", sa.String(200), nullable=False),  # the officer of that domain
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("basis", sa.String(200), nullable=False),  # what was consented to (a re-issue: the record's state)
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.String(32), nullable=False),
)

#: The audit chain's head: one row, locked by every append (kms.audit.log), so the chain stays linear and gap-free.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

#: The audit records: body is the canonical JSON that was hashed, hash = SHA-256(prev ‖ body).
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("domain", sa.String(16), nullable=False),
    sa.Column("prev", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_audit_log_at", "at"),
)

#: Signed checkpoints of the audit chain (size, head hash, time), by the audit signing key.
audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("size", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("head", sa.String(64), nullable=False),
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("key", sa.String(160), nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    # The ``server.replica`` whose checkpointer asked for it; NULL for checkpoints made before schema 0002.
    sa.Column("replica", sa.String(64), nullable=True),
)

#: At a station: every bundle serial opened there, so that a replayed bundle is refused.
opened_bundles = sa.Table(
    "opened_bundles",
    sa.MetaData(),
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("card_ref", sa.String(64), nullable=False),
    sa.Column("opened_at", sa.String(32), nullable=False),
)


def make_engine(url: str, *, create: bool = True) -> sa.Engine:
    """An engine for this URL; SQLite gets foreign keys and a busy timeout so that processes can share it, and a
    database file created 0600 before SQLite first opens it (kms.files); without ``create``, a SQLite file that does
    not exist is refused (ConfigError naming it) rather than made. Storage faults of either database come out of it
    as StorageUnavailable (``translate_storage_faults``)."""
    if url.startswith("sqlite"):
        if create:
            _create_sqlite_file(url)
        else:
            _require_sqlite_file(url)
        engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # type: ignore[no-untyped-def]
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            _wal(cur)
            cur.close()

        return translate_storage_faults(engine)
    return translate_storage_faults(sa.create_engine(url, pool_pre_ping=True))


def _wal(cur: Any) -> None:
    """WAL mode (kept in the database file: set once, by the first connection). Switching a new database to it
    needs its lock, and SQLite answers "database is locked" at once, without the busy timeout, while another
    connection holds one (processes or replicas opening a new database together): tried again until BUSY_TIMEOUT."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# -- storage faults ------------------------------------------------------------------------------------------------
# A database that cannot be reached, read or written now (I/O error, full disk, locked past the busy timeout, a
# connection lost or refused, a server shutting down) is the service's outage, not the caller's mistake nor a bug:
# every store's call then raises StorageUnavailable, an Unavailable (gRPC UNAVAILABLE, exit 12; clients retry it).
# Everything else a database says (constraint violations, SQL errors, a corrupt file) stays what it is.

BUSY_TIMEOUT = 30  # seconds SQLite waits for another writer's lock before "database is locked"

#: SQLite primary result codes that are storage faults, and how the refusal names them.
_SQLITE_FAULTS = {sqlite3.SQLITE_IOERR: "disk I/O error", sqlite3.SQLITE_FULL: "disk full",
                  sqlite3.SQLITE_CANTOPEN: "cannot open the database file", sqlite3.SQLITE_BUSY: "database locked",
                  sqlite3.SQLITE_LOCKED: "database locked", sqlite3.SQLITE_NOMEM: "out of memory",
                  sqlite3.SQLITE_READONLY: "database read-only"}
#: The same by message, for an error that carries no result code (raised by a driver shim or a fault injector).
_SQLITE_MESSAGES = {"disk i/o error": "disk I/O error", "database or disk is full": "disk full",
                    "unable to open database file": "cannot open the database file",
                    "database is locked": "database locked", "database table is locked": "database locked",
                    "out of memory": "out of memory", "attempt to write a readonly database": "database read-only"}
#: PostgreSQL SQLSTATEs (and classes: two characters) that are storage faults.
_POSTGRES_FAULTS = {"08": "connection lost", "57P01": "database server shutting down",
                    "57P02": "database server crashed", "57P03": "database server not accepting connections",
                    "57014": "statement cancelled", "53100": "disk full", "53200": "out of memory",
                    "53300": "too many connections", "53": "insufficient resources", "58030": "disk I/O error",
                    "58": "system error", "40001": "serialization failure", "40P01": "deadlock",
                    "55P03": "lock not available"}


def storage_fault(error: BaseException, disconnected: bool = False) -> str | None:
    """What storage fault a DBAPI error (or SQLAlchemy's wrapper of one) is, in a few words, or None if it is not
    one. ``disconnected``: SQLAlchemy found the connection lost."""
    if isinstance(error, sa.exc.DBAPIError):
        disconnected = disconnected or error.connection_invalidated
        if error.orig is not None:
            error = error.orig
    if disconnected:
        return "connection lost"
    if isinstance(error, sqlite3.Error):
        if not isinstance(error, sqlite3.OperationalError):
            return None
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return _SQLITE_FAULTS.get(code & 0xFF)
        text = str(error).lower()
        return next((reason for message, reason in _SQLITE_MESSAGES.items() if text.startswith(message)), None)
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if state:
        return _POSTGRES_FAULTS.get(state) or _POSTGRES_FAULTS.get(state[:2])
    # No SQLSTATE: a PostgreSQL driver's connection failure (refused, timed out, the server gone).
    if type(error).__module__.split(".")[0] in ("psycopg", "psycopg2") and type(error).__name__ == "OperationalError":
        return "cannot connect"
    return None


def translate_storage_faults(engine: sa.Engine) -> sa.Engine:
    """Make ``engine`` raise StorageUnavailable for a storage fault (``storage_fault``) in any statement, commit or
    connect, in the one place every store's database work passes (SQLAlchemy's ``handle_error`` event); the
    database's own message goes to the log only (it may name hosts and files)."""
    event.listen(engine, "handle_error", _on_error)
    return engine


def _on_error(context: sa.engine.ExceptionContext) -> BaseException | None:
    if context.is_pre_ping:  # the pool tests a pooled connection and replaces it itself
        return None
    reason = storage_fault(context.original_exception, context.is_disconnect)
    if reason is None:
        return None
    log.warning("database unavailable (%s): %s: %s", reason, type(context.original_exception).__name__,
                str(context.original_exception).strip().splitlines()[0] if str(context.original_exception) else "")
    return StorageUnavailable(reason)


def _create_sqlite_file(url: str) -> None:
    """SQLite creates a missing database with the umask's mode and gives its -wal and -shm files the database
    file's mode: it holds card data, so it is made 0600 here first."""
    parsed = sa.make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or "uri" in parsed.query:
        return  # in memory, or a URI filename SQLite opens itself
    path = Path(database)
    if path.parent.is_dir():
        create_private(path)


def _require_sqlite_file(url: str) -> None:
    database = sa.make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:") and not Path(database).is_file():
        raise ConfigError(f"{database}: no such database file")


def create_station_ledger(engine: sa.Engine) -> None:
    opened_bundles.metadata.create_all(engine)


#: Issuance batches (work orders): one bureau, one profile, a fixed list of cards. Managed by kms.issuance.batches.
#: ``batch_id`` is 1-64 characters of the card_ref charset; ``card_count`` is fixed at creation.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("bureau", sa.String(64), nullable=False),
    sa.Column("profile", sa.String(64), nullable=False),
    sa.Column("state", sa.String(24), nullable=False),  # awaiting-authorization | open | closed
    sa.Column("cards_digest", sa.String(64), nullable=False),  # SHA-256 of the canonical card list
    sa.Column("created_by", sa.String(200), nullable=False),  # principal URI
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("card_count", sa.Integer, nullable=False),
)

#: One card of a batch, primary key (batch_id, card_ref): its identity, chip binding and, once issued, the sealed
#: bundle (kept so that a retried request returns the same bytes) with the idempotency key of the request that
#: issued it. ``sequence``, the card's 0-based position in the batch, is unique per batch: the cursor of resumable
#: streaming. ``bound_fields`` names the chip fields filled by binding at the station (space-separated), as opposed
#: to fields the batch supplied; a re-issue clears exactly those, and serial, bundle and idempotency key.
batch_cards = sa.Table(
    "batch_cards",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.batch_id"), primary_key=True),
    sa.Column("card_ref", sa.String(64), primary_key=True),
    sa.Column("sequence", sa.Integer, nullable=False),  # 0-based position in the batch
    sa.Column("city_code", sa.String(6), nullable=True),
    sa.Column("card_serial", sa.String(16), nullable=True),
    # The PAN only protected (kms.issuance.pans): AES-GCM under the bank's data key, keyed indexes, masked (6/4).
    sa.Column("pan_sealed", sa.LargeBinary, nullable=True),
    sa.Column("pan_index", sa.String(64), nullable=True),
    sa.Column("pan_psn_index", sa.String(64), nullable=True),
    sa.Column("pan_masked", sa.String(19), nullable=True),
    sa.Column("psn", sa.String(2), nullable=True),
    sa.Column("kdd", sa.String(20), nullable=True),
    sa.Column("bound_fields", sa.String(64), nullable=True),
    sa.Column("chip_bound_at", sa.String(32), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),  # pending | issued | revoked
    sa.Column("serial", sa.String(64), nullable=True),  # bundle serial
    sa.Column("bundle", sa.LargeBinary, nullable=True),
    sa.Column("idempotency_key", sa.String(128), nullable=True),
    sa.Column("issued_at", sa.String(32), nullable=True),
    sa.UniqueConstraint("batch_id", "sequence", name="uq_batch_cards_sequence"),
)

#: Append-only history of every card of a batch (kms.issuance.batches.EventKind): created, chip-bound, issued,
#: reissue-revoked, lifecycle-revoked (the card was replaced or cancelled, kms.issuance.lifecycle).
card_events = sa.Table(
    "card_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("card_ref", sa.String(64), nullable=False),
    sa.Column("event", sa.String(24), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("by", sa.String(200), nullable=True),  # principal URI, when the caller named one
    sa.ForeignKeyConstraint(["batch_id", "card_ref"], ["batch_cards.batch_id", "batch_cards.card_ref"]),
    sa.Index("ix_card_events_card", "batch_id", "card_ref", "id"),
)

#: Card lifecycle (kms.issuance.lifecycle): the current state of each application of a card, by card_ref across all
#: batches; a row exists once anything happened to the card (no row: both applications active). ``version`` makes
#: every change a conditional UPDATE.
card_lifecycle = sa.Table(
    "card_lifecycle",
    metadata,
    sa.Column("card_ref", sa.String(64), primary_key=True),
    sa.Column("hrss_state", sa.String(16), nullable=False),  # active | lost | cancelled | closed | replaced
    sa.Column("bank_state", sa.String(16), nullable=False),
    sa.Column("replaced_by", sa.String(64), nullable=True, unique=True),
    sa.Column("replaces", sa.String(64), nullable=True, unique=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("changed_at", sa.String(32), nullable=False),
)

#: Append-only history of card lifecycle changes: who, when, what, why.
card_lifecycle_events = sa.Table(
    "card_lifecycle_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("card_ref", sa.String(64), nullable=False),
    sa.Column("application", sa.String(16), nullable=True),  # hrss | bank; NULL: the card as a whole
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("by", sa.String(200), nullable=False),  # principal URI
    sa.Index("ix_card_lifecycle_events_card", "card_ref", "id"),
)

#: Identities of replaced cards, never to be issued again: card_serial, pan_psn (the keyed index of "<pan>/<psn>"),
#: kdd.
retired_identities = sa.Table(
    "retired_identities",
    metadata,
    sa.Column("field", sa.String(16), primary_key=True),
    sa.Column("value", sa.String(64), primary_key=True),  # pan_psn: its keyed index (kms.issuance.pans), never the PAN
    sa.Column("shown", sa.String(40), nullable=True),  # how messages show it (a PAN masked 6/4)
    sa.Column("card_ref", sa.String(64), nullable=False),  # the replaced card
    sa.Column("retired_at", sa.String(32), nullable=False),
    sa.Column("retired_by", sa.String(200), nullable=False),
)

#: A card's records across batches (lifecycle look-ups by card_ref).
sa.Index("ix_batch_cards_card_ref", batch_cards.c.card_ref)

#: Stations' issuance in a sliding window (kms.issuance.limits counts ``issued`` events by time, then by station).
ix_card_events_issued = sa.Index("ix_card_events_issued", card_events.c.event, card_events.c.at, card_events.c.by)

#: Issuance limits set by ``set-limits`` ceremonies (kms.issuance.limits), per key domain: ``scope`` station or bureau,
#: ``subject`` a station's URI, a bureau's name or "default"; ``name`` cards_per_hour | cards_per_day |
#: concurrent_streams. The defaults are kms/policies/limits.yaml.
limits = sa.Table(
    "limits",
    metadata,
    sa.Column("domain", sa.String(16), primary_key=True),
    sa.Column("scope", sa.String(16), primary_key=True),
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
    sa.Column("ceremony_id", sa.String(64), nullable=False),
    sa.Column("at", sa.String(32), nullable=False),
)



#: URL query parameters (libpq's) that carry a secret or name where one is: masked wherever a database URL is shown.
_SECRET_QUERY = frozenset({"password", "sslpassword", "passfile"})


def database_display(url: str | sa.URL) -> str:
    """The database URL without its password, in the user information or in the query (``password``,
    ``sslpassword``, ``passfile``): for logs, ``service.started``, ``kms db current`` and refusals."""
    parsed = sa.make_url(url)
    secret = {key: "***" for key in parsed.query if key.lower() in _SECRET_QUERY}
    if secret:
        parsed = parsed.update_query_dict(secret)
    return parsed.render_as_string(hide_password=True)


def ping(engine: sa.Engine) -> None:
    """Read one small table (the audit chain's head): raises whatever the database raises if it cannot serve now
    (the health monitor's check, kms.server.health)."""
    with engine.connect() as conn:
        conn.execute(sa.select(sa.func.count()).select_from(audit_head)).scalar_one()


# -- the schema's revisions (kms/migrations) -----------------------------------------------------------------------
# The tables above are the schema at the head revision of kms/migrations/versions; tests/test_migrations.py fails
# when they differ. Every process that opens the records database requires it at that revision (require_current);
# only `kms db upgrade` (upgrade) changes an existing one, and an empty one is created at head by the processes that
# start a deployment (`kms serve`, `kms init`; never `kms worker`, whose database role need not own the tables).

MIGRATIONS = Path(__file__).with_name("migrations")
#: The revision a database made by a kms before schema migrations is stamped with once it matches its schema.
BASELINE = "0001_baseline"
#: This kms's head revision, known without loading Alembic: what ``require_head`` compares the database's recorded
#: revision with. tests/migrations/test_revisions.py keeps it equal to the head of kms/migrations/versions.
HEAD = "0002_checkpoint_replica"
#: How long a schema change waits for a table lock a running kms holds (PostgreSQL's lock_timeout) before it gives
#: up (Unavailable, naming the replicas to stop).
LOCK_TIMEOUT = "10s"

SchemaState = Literal["empty", "current", "older", "newer", "unversioned"]


@dataclass(frozen=True)
class SchemaStatus:
    """A database's schema against this kms's revisions: ``current`` its revision (None: none recorded), ``head``
    this kms's, ``state`` "empty" (no kms table), "current", "older" (an earlier revision of this kms: ``kms db
    upgrade``), "newer" (a revision this kms does not know: a later kms wrote it), "unversioned" (tables made by a
    kms before schema migrations, no revision recorded: ``kms db upgrade``)."""

    current: str | None
    head: str
    state: SchemaState


# Alembic (and Mako, which it loads) is imported inside the functions below: only the processes that check or change
# the schema load it, not the HSM worker processes nor the client commands (tests/test_imports.py).

def _scripts() -> ScriptDirectory:
    return _scripts_at(str(MIGRATIONS))


@functools.cache
def _scripts_at(location: str) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(location)


def _alembic_config(connection: sa.Connection, schema: str | None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    cfg.attributes["version_table_schema"] = schema  # env.py names it to Alembic
    return cfg


def _baseline() -> sa.MetaData:
    """The baseline revision's tables (``schema()`` of versions/0001_baseline.py)."""
    revision = _scripts().get_revision(BASELINE)
    assert revision is not None
    baseline: sa.MetaData = revision.module.schema()
    return baseline


def _known_tables() -> set[str]:
    return set(metadata.tables) | set(_baseline().tables)


def schema_of(conn: sa.Connection) -> str | None:
    """The schema kms's tables and its revision table live in: None on SQLite; on PostgreSQL ``current_schema()``
    (the first schema of search_path that exists), resolved once and named in every read and change of the revision
    table (with several schemas in search_path an unqualified ``alembic_version`` could be another schema's).
    ConfigError if no schema of search_path exists."""
    if conn.dialect.name != "postgresql":
        return None
    name = conn.execute(sa.text("SELECT current_schema()")).scalar()
    if name is None:
        raise ConfigError(f"{_display(conn.engine)}: the schema named by search_path does not exist (create it, or "
                          "correct search_path in the database URL's options)")
    return str(name)


@contextlib.contextmanager
def _refusals(engine: sa.Engine) -> Iterator[None]:
    """A database role that may not read or change the schema (PostgreSQL's insufficient_privilege, 42501): one
    line (ConfigError) naming what it may not do, not an internal error."""
    try:
        yield
    except sa.exc.DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) != "42501":
            raise
        said = str(error.orig).strip().splitlines()[0] if str(error.orig).strip() else "permission denied"
        raise ConfigError(f"{_display(engine)}: the database role may not do this ({said}): the schema is created "
                          "and upgraded by its owner's role with `kms db upgrade`; runtime roles need SELECT on "
                          "alembic_version (docs/operations.md, \"Upgrading kms\")") from None


def _status(conn: sa.Connection, schema: str | None) -> SchemaStatus:
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    scripts = _scripts()
    head = scripts.get_current_head()
    assert head is not None
    try:
        current = MigrationContext.configure(conn, opts={"version_table_schema": schema}).get_current_revision()
    except CommandError as error:  # e.g. two rows in alembic_version
        raise ConfigError(f"{_display(conn.engine)}: the schema's revision table alembic_version is not one kms "
                          f"writes ({error})") from None
    if current is None:
        tables = set(sa.inspect(conn).get_table_names(schema=schema)) & _known_tables()
        return SchemaStatus(None, head, "unversioned" if tables else "empty")
    if current == head:
        return SchemaStatus(current, head, "current")
    known = {script.revision for script in scripts.walk_revisions()}
    return SchemaStatus(current, head, "older" if current in known else "newer")  # unknown: a later kms's


def schema_status(engine: sa.Engine) -> SchemaStatus:
    """Where this database's schema stands against this kms's revisions (reads only)."""
    with _refusals(engine), engine.connect() as conn:
        return _status(conn, schema_of(conn))


@contextlib.contextmanager
def _schema_lock(engine: sa.Engine) -> Iterator[tuple[sa.Connection, str | None]]:
    """One transaction holding the right to change the schema, committed at the end, with the schema it changes
    (``schema_of``). PostgreSQL: the transaction-level advisory lock for that schema (replicas starting together wait
    for each other; DDL is transactional there), then a lock_timeout of LOCK_TIMEOUT for the tables' locks. SQLite:
    its write lock taken at BEGIN IMMEDIATE (its DDL is transactional too, once inside a transaction), foreign keys
    off meanwhile (a revision that recreates a parent table, Alembic's batch mode, would otherwise fail on real rows;
    the pragma cannot change inside a transaction) and checked before the commit (``PRAGMA foreign_key_check``)."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn, None
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    tables = ", ".join(sorted({str(row[0]) for row in broken}))
                    raise ConfigError(f"{_display(engine)}: the schema change would leave rows of {tables} whose "
                                      "foreign key points nowhere; nothing was changed")
                conn.commit()
            finally:
                conn.rollback()  # nothing to undo after the commit
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")  # the pooled connection as make_engine made it
                conn.commit()
            return
        schema = schema_of(conn)
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('kms.schema'), hashtext(:schema))"),
                         {"schema": schema})
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        yield conn, schema
        conn.commit()


def upgrade(engine: sa.Engine, *, only_from: Collection[SchemaState] | None = None,
            config: object = "kms.yaml") -> tuple[str | None, str]:
    """Bring the database to this kms's head revision, in one transaction under the schema lock, and say from which
    revision to which (from None: it was empty or unversioned; from == to: nothing to do). An unversioned database
    with the baseline's schema is stamped ``0001_baseline`` first (missing tables or indexes the kms before
    migrations would have added are added); one whose schema differs otherwise is refused (ConfigError naming the
    differences), and so is a database at a revision this kms does not know. ``only_from``: the states (as found
    under the lock) it may start from; any other is refused as ``require_current`` refuses it (``config`` named in
    that line). A table lock held by a running kms for over LOCK_TIMEOUT: Unavailable, naming the replicas to
    stop."""
    from alembic import command

    try:
        with _refusals(engine), _schema_lock(engine) as (conn, schema):
            status = _status(conn, schema)
            if status.state == "current":
                return status.current, status.head
            if status.state == "newer" or (only_from is not None and status.state not in only_from):
                raise ConfigError(_refusal(engine, status, config))
            cfg = _alembic_config(conn, schema)
            if status.state == "unversioned":
                _adopt(engine, conn)
                command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")
            return status.current, status.head
    except StorageUnavailable as error:
        if error.reason != "lock not available":
            raise
        raise Unavailable(f"{_display(engine)}: the schema upgrade waited over {LOCK_TIMEOUT} for a table a running "
                          "kms holds: stop every kms serve and kms worker on this database, then run `kms db "
                          "upgrade` again") from None


def require_current(engine: sa.Engine, *, create: bool = False, config: object = "kms.yaml") -> SchemaStatus:
    """Refuse (ConfigError, one line naming ``kms db upgrade --config <config>``) a database whose schema is not at
    this kms's head revision; with ``create``, an empty one is first created at head (logged; refused as any other
    if another process left it in another state meanwhile). Returns the status found (state "empty": it was
    created now)."""
    status = schema_status(engine)
    if status.state == "current":
        return status
    if status.state == "empty" and create:
        upgrade(engine, only_from={"empty"}, config=config)
        log.info("%s: no kms tables: the schema was created at revision %s", _display(engine), status.head)
        return status
    raise ConfigError(_refusal(engine, status, config))


def require_head(engine: sa.Engine, *, config: object = "kms.yaml") -> None:
    """``require_current`` at the cost of one read, for processes whose parent checked the schema already (the HSM
    worker processes, the key registry): the revision recorded in alembic_version compared with HEAD, without
    loading Alembic. Anything but HEAD (no revision table, another revision, no privilege) goes to
    ``require_current``, which says what it is."""
    try:
        with engine.connect() as conn:
            version = sa.table("alembic_version", sa.column("version_num"), schema=schema_of(conn))
            found = list(conn.execute(sa.select(version.c.version_num)).scalars())
    except sa.exc.DBAPIError:
        found = []
    if found != [HEAD]:
        require_current(engine, config=config)


def _refusal(engine: sa.Engine, status: SchemaStatus, config: object) -> str:
    if status.state == "newer":
        return (f"{_display(engine)}: the database schema (revision {status.current}) is newer than this kms "
                f"({status.head}); upgrade kms")
    found = {"older": f"at revision {status.current}",
             "unversioned": "from a kms before schema migrations (no revision recorded)",
             "empty": "empty (no kms tables)", "current": f"at revision {status.current}"}[status.state]
    return (f"{_display(engine)}: the database schema is {found}, this kms needs {status.head}: run "
            f"`kms db upgrade --config {config}`")


def _display(engine: sa.Engine) -> str:
    return database_display(engine.url)


def schema_differences(conn: sa.Connection, target: sa.MetaData) -> list[str]:
    """How the database's tables differ from ``target``'s (Alembic's autogenerate comparison: tables, columns,
    types, nullability, server defaults, indexes, unique and foreign key constraints; and primary keys), one short
    phrase each; tables that are not kms's are left out. Empty: the same schema."""
    return [text for _, text in _compare(conn, target)]


def _compare(conn: sa.Connection, target: sa.MetaData) -> list[tuple[tuple[Any, ...], str]]:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    known = _known_tables() | set(target.tables)

    def include_name(name: str | None, kind: str, parents: Mapping[str, str | None]) -> bool:
        return kind != "table" or name in known

    context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True,
                                                     "include_name": include_name})
    found = []
    for diff in compare_metadata(context, target):
        for change in diff if isinstance(diff, list) else [diff]:  # a column's modifications come as a list
            found.append((change, _describe(change)))
    # Alembic's comparison leaves primary keys out.
    inspector = sa.inspect(conn)
    existing = set(inspector.get_table_names())
    for table in target.sorted_tables:
        if table.name not in existing:
            continue
        has = list(inspector.get_pk_constraint(table.name).get("constrained_columns") or [])
        wants = [column.name for column in table.primary_key.columns]
        if has != wants:
            found.append((("modify_pk", table.name, has, wants),
                          f"{table.name} has primary key ({', '.join(has)}), kms makes it ({', '.join(wants)})"))
    return found


def _describe(change: tuple[Any, ...]) -> str:
    kind = change[0]
    if kind == "add_table":
        return f"lacks table {change[1].name}"
    if kind == "remove_table":
        return f"has table {change[1].name}, which kms does not make"
    if kind in ("add_column", "remove_column"):
        name = f"{change[2]}.{change[3].name}"
        return f"lacks {name}" if kind == "add_column" else f"has {name}, which kms does not make"
    if kind in ("add_index", "remove_index"):
        index = change[1]
        return f"{'lacks' if kind == 'add_index' else 'has'} index {index.name} on {index.table.name}"
    if kind == "modify_type":
        return f"{change[2]}.{change[3]} is {change[5]}, kms makes it {change[6]}"
    if kind == "modify_nullable":
        def nullable(flag: object) -> str:
            return "nullable" if flag else "NOT NULL"
        return f"{change[2]}.{change[3]} is {nullable(change[5])}, kms makes it {nullable(change[6])}"
    if kind == "modify_default":
        return f"{change[2]}.{change[3]} has default {change[5]}, kms makes it {change[6]}"
    if kind in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        constraint = change[1]
        what = "foreign key" if kind.endswith("fk") else "constraint"
        columns = ", ".join(c.name for c in constraint.columns)
        return f"{'lacks' if kind.startswith('add') else 'has'} {what} on {constraint.table.name} ({columns})"
    return f"{kind} {' '.join(str(part) for part in change[1:] if part is not None)}"


def _adopt(engine: sa.Engine, conn: sa.Connection) -> None:
    """An unversioned database made ready for the baseline stamp: what a kms before migrations added at its own
    start (tables, and indexes on existing tables, that a later version of it introduced) is added; any other
    difference from the baseline refuses it."""
    baseline = _baseline()
    found = _compare(conn, baseline)
    other = [text for change, text in found if change[0] not in ("add_table", "add_index")]
    if other:
        shown = ", ".join(other[:4]) + (" …" if len(other) > 4 else "")
        raise ConfigError(f"{_display(engine)}: this database was made by an older kms and its schema is not the one "
                          f"schema migrations start from ({shown}); it is not upgraded in place: create a new one")
    missing = [baseline.tables[change[1].name] for change, _ in found if change[0] == "add_table"]
    baseline.create_all(conn, tables=missing)
    made = {table.name for table in missing}
    for change, _ in found:
        if change[0] == "add_index" and change[1].table.name not in made:
            change[1].create(conn)


# -- locks across replicas -----------------------------------------------------------------------------------------
# Several `kms serve` replicas on one PostgreSQL database serialise a few things that are not one row's conditional
# change with PostgreSQL advisory locks (kms.audit.log's checkpoint lock, kms.ceremony.store's execution lock,
# kms.issuance.limits' stream slots). A lock held by a session ends with it: a replica that dies (or loses its
# connection) holds nothing. Advisory locks are per database, not per schema: every key is a hash that includes
# current_schema(), so that two kms on one database in schemas of their own (the tests do that) do not share locks,
# and so every replica of one kms must resolve the same schema (the same search_path; service.started records it).
#
# Key spaces (each a 64-bit hashtextextended, single-bigint advisory locks; a seed per space, so that no key of one
# space is computed like a key of another):
#   seed 0  named locks            'kms:' || schema || ':' || name            (``lock_for_transaction``, ``try_lock``)
#   seed 1  stream slots           'kms:' || schema || ':stream:' || scope || ':' || subject || ':' || slot
#                                                                             (``try_lock_slot``, ``unlock_slot``)
# The schema upgrade's lock (``upgrade``) takes the two-int4 form (hashtext('kms.schema'), hashtext(schema)), which
# PostgreSQL keeps apart from every single-bigint key (pg_locks.objsubid 2, not 1).

#: The key of the lock named :name (hashtextextended: PostgreSQL 11+).
_KEY = "hashtextextended('kms:' || current_schema() || ':' || :name, 0)"
#: The key of stream slot :slot of :scope :subject's concurrent_streams.
_SLOT_KEY = ("hashtextextended('kms:' || current_schema() || ':stream:' || :scope || ':' || :subject || ':' "
             "|| CAST(:slot AS text), 1)")

#: How long a replica waits for a lock another holds (the checkpoint lock) before giving up with StorageUnavailable
#: (a frozen holder must not block every other replica's checkpoints, exports and shutdown for ever).
LOCK_WAIT = 30.0


def is_postgresql(bind: sa.Engine | sa.Connection) -> bool:
    return bind.dialect.name == "postgresql"


def current_schema(engine: sa.Engine) -> str | None:
    """PostgreSQL: the schema this engine's sessions resolve (part of every lock key: all replicas must resolve the
    same one); None on SQLite."""
    if not is_postgresql(engine):
        return None
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT current_schema()")).scalar())


def lock_for_transaction(conn: sa.Connection, name: str, timeout: float | None = None) -> None:
    """PostgreSQL: wait for the lock ``name``, held until ``conn``'s transaction ends (pg_advisory_xact_lock); after
    ``timeout`` seconds (default LOCK_WAIT) StorageUnavailable ("lock not available": SQLSTATE 55P03 of
    lock_timeout)."""
    timeout = LOCK_WAIT if timeout is None else timeout
    before = conn.execute(sa.text("SELECT current_setting('lock_timeout'), set_config('lock_timeout', :t, true)"),
                          {"t": f"{max(1, int(timeout * 1000))}ms"}).scalar()
    conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_KEY})"), {"name": name})
    # the rest of the transaction waits as before (set_config(..., true) ends with the transaction anyway)
    conn.execute(sa.text("SELECT set_config('lock_timeout', :t, true)"), {"t": before})


def try_lock_for_transaction(conn: sa.Connection, name: str) -> bool:
    """PostgreSQL: the lock ``name`` until ``conn``'s transaction ends, if no other session holds it now."""
    return bool(conn.execute(sa.text(f"SELECT pg_try_advisory_xact_lock({_KEY})"), {"name": name}).scalar())


def try_lock(conn: sa.Connection, name: str) -> bool:
    """PostgreSQL: the lock ``name`` for ``conn``'s session (until ``unlock`` or the session ends), if no other
    session holds it now."""
    return bool(conn.execute(sa.text(f"SELECT pg_try_advisory_lock({_KEY})"), {"name": name}).scalar())


def unlock(conn: sa.Connection, name: str) -> None:
    conn.execute(sa.text(f"SELECT pg_advisory_unlock({_KEY})"), {"name": name})


def try_lock_slot(conn: sa.Connection, scope: str, subject: str, slot: int) -> bool:
    """PostgreSQL: stream slot ``slot`` of ``scope`` ``subject`` for ``conn``'s session, if no session holds it."""
    return bool(conn.execute(sa.text(f"SELECT pg_try_advisory_lock({_SLOT_KEY})"),
                             {"scope": scope, "subject": subject, "slot": slot}).scalar())


def unlock_slot(conn: sa.Connection, scope: str, subject: str, slot: int) -> None:
    conn.execute(sa.text(f"SELECT pg_advisory_unlock({_SLOT_KEY})"), {"scope": scope, "subject": subject,
                                                                     "slot": slot})


def keep_session(conn: sa.Connection) -> None:
    """PostgreSQL: a session that holds advisory locks while it sits idle (stream slots, a ceremony's execution)
    must not be ended by the server's own idle timeouts: turn them off for it (PostgreSQL 14+ has
    idle_session_timeout). Timeouts outside the server (a proxy, a pooler, a firewall) are the operator's to lift
    (docs/deployment.md, "Scale-out")."""
    conn.execute(sa.text("SELECT set_config('idle_in_transaction_session_timeout', '0', false)"))
    version = conn.dialect.server_version_info or (0,)
    if version >= (14,):
        conn.execute(sa.text("SELECT set_config('idle_session_timeout', '0', false)"))


def sqlite_lock_path(engine: sa.Engine, name: str) -> Path | None:
    """The lock file of lock ``name`` beside the SQLite database file of ``engine``, or None for an in-memory
    database (one process). A ``file:`` URI names its file in its path."""
    database = engine.url.database
    if not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        parts = urllib.parse.urlsplit(database)
        mode = urllib.parse.parse_qs(parts.query).get("mode") or engine.url.query.get("mode")
        path = urllib.parse.unquote(parts.path)
        if not path or path == ":memory:" or mode in ("memory", ["memory"]):
            return None
        database = path
    return Path(f"{database}.{name}.lock")


@contextmanager
def sqlite_file_lock(engine: sa.Engine, name: str, timeout: float | None = None) -> Iterator[None]:
    """SQLite: the lock ``name`` across the processes of one host that share the database file: an exclusive
    ``flock`` of ``<database>.<name>.lock`` (0600, beside it; a ``file:`` URI's file likewise), held for the ``with``
    block and released if the process dies. It blocks no reader or writer of the database itself. An in-memory
    database has one process. Waits at most ``timeout`` seconds (default LOCK_WAIT) for another process's hold
    (StorageUnavailable "lock not available" then). The lock file must be a regular file of this user (not a
    symbolic link)."""
    path = sqlite_lock_path(engine, name)
    if path is None:
        yield
        return
    create_private(path)
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:  # e.g. ELOOP: a symbolic link put in its place
        raise ConfigError(f"{path}: cannot open the lock file ({error.strerror}); remove it") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError(f"{path} is not a regular file of this user; remove it")
        deadline = time.monotonic() + (LOCK_WAIT if timeout is None else timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StorageUnavailable("lock not available") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
