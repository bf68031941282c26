"""The record store: SQLAlchemy 2 Core tables, SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import event

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

#: At a station: every bundle serial opened there, so that a replayed bundle is refused.
opened_bundles = sa.Table(
    "opened_bundles",
    sa.MetaData(),
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("card_ref", sa.String(64), nullable=False),
    sa.Column("opened_at", sa.String(32), nullable=False),
)


def make_engine(url: str) -> sa.Engine:
    """An engine for this URL; SQLite gets foreign keys and a busy timeout so that processes can share it."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # type: ignore[no-untyped-def]
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def create_all(engine: sa.Engine) -> None:
    metadata.create_all(engine)


def create_station_ledger(engine: sa.Engine) -> None:
    opened_bundles.metadata.create_all(engine)


#: Issuance batches (work orders): one bureau, one profile, a fixed list of cards. Managed by kms.batches.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("bureau", sa.String(64), nullable=False),
    sa.Column("profile", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # open | closed
    sa.Column("created_by", sa.String(200), nullable=False),  # principal URI
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("card_count", sa.Integer, nullable=False),
)

#: One card of a batch: its identity, chip binding and, once issued, the sealed bundle (kept so that a retried
#: request returns the same bytes). ``bound_fields`` names the chip fields filled by binding at the station
#: (space-separated), as opposed to fields the batch supplied; a re-issue clears exactly those.
batch_cards = sa.Table(
    "batch_cards",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.batch_id"), primary_key=True),
    sa.Column("card_ref", sa.String(64), primary_key=True),
    sa.Column("sequence", sa.Integer, nullable=False),  # 0-based position in the batch
    sa.Column("city_code", sa.String(6), nullable=True),
    sa.Column("card_serial", sa.String(16), nullable=True),
    sa.Column("pan", sa.String(19), nullable=True),
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

#: Append-only history of every card: created, chip-bound, issued, reissue-revoked.
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
