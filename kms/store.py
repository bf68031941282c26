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
