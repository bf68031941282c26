"""The baseline: the schema of kms before schema migrations (commit 5a25ab4), exactly, on SQLite and PostgreSQL.

A database made by such a kms has these tables and no ``alembic_version``; ``kms db upgrade`` compares it with
``schema()``, adds what that kms itself would have added at its next start (a table or an index made by a later
version of it), refuses anything else, stamps it with this revision and upgrades it. The tables are a frozen copy
of ``kms.store``'s as they were then: never change them here; a change is a new revision.

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def schema() -> sa.MetaData:
    """The baseline's tables, indexes and constraints (a new MetaData each call)."""
    m = sa.MetaData()
    sa.Table(
        "keys", m,
        sa.Column("domain", sa.String(16), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("label", sa.String(160), nullable=False, unique=True),
        sa.Column("kcv", sa.String(16), nullable=True),
        sa.Column("kcv_method", sa.String(32), nullable=True),
        sa.Column("public_key", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("state_changed_at", sa.String(32), nullable=False),
    )
    sa.Table(
        "officers", m,
        sa.Column("principal", sa.String(200), primary_key=True),
        sa.Column("domain", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("roles", sa.String(200), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("enrolled_at", sa.String(32), nullable=False),
        sa.Column("enrolled_by", sa.String(64), nullable=False),
        sa.Column("cert_sha256", sa.String(64), nullable=False),
    )
    sa.Table(
        "principal_grants", m,
        sa.Column("principal", sa.String(200), primary_key=True),
        sa.Column("domain", sa.String(16), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("cert_sha256", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("ceremony_id", sa.String(64), nullable=False),
        sa.Column("changed_at", sa.String(32), nullable=False),
    )
    sa.Table(
        "ceremonies", m,
        sa.Column("ceremony_id", sa.String(64), primary_key=True),
        sa.Column("domain", sa.String(16), nullable=False),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("proposer", sa.String(200), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.String(32), nullable=False),
        sa.Column("encoding", sa.LargeBinary, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("closed_at", sa.String(32), nullable=True),
        sa.Column("closed_by", sa.String(200), nullable=True),
        sa.Index("ix_ceremonies_domain_state", "domain", "state"),
    )
    sa.Table(
        "ceremony_approvals", m,
        sa.Column("ceremony_id", sa.String(64), sa.ForeignKey("ceremonies.ceremony_id"), primary_key=True),
        sa.Column("officer", sa.String(200), primary_key=True),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
    )
    sa.Table(
        "ceremony_components", m,
        sa.Column("ceremony_id", sa.String(64), sa.ForeignKey("ceremonies.ceremony_id"), primary_key=True),
        sa.Column("custodian", sa.String(200), primary_key=True),
        sa.Column("direction", sa.String(8), primary_key=True),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("kcv", sa.String(16), nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
    )
    sa.Table(
        "batch_authorizations", m,
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.batch_id"), primary_key=True),
        sa.Column("domain", sa.String(16), primary_key=True),
        sa.Column("ceremony_id", sa.String(64), nullable=False),
        sa.Column("key_versions", sa.Text, nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
    )
    sa.Table(
        "transport_handoffs", m,
        sa.Column("domain", sa.String(16), primary_key=True),
        sa.Column("bureau", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("station", sa.String(200), nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("kcv", sa.String(16), nullable=False),
        sa.Column("ceremony_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("accepted_at", sa.String(32), nullable=True),
    )
    sa.Table(
        "consents", m,
        sa.Column("action", sa.String(16), primary_key=True),
        sa.Column("subject", sa.String(200), primary_key=True),
        sa.Column("domain", sa.String(16), primary_key=True),
        sa.Column("by", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("basis", sa.String(200), nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.String(32), nullable=False),
    )
    sa.Table(
        "audit_head", m,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    sa.Table(
        "audit_log", m,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("domain", sa.String(16), nullable=False),
        sa.Column("prev", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Index("ix_audit_log_at", "at"),
    )
    sa.Table(
        "audit_checkpoints", m,
        sa.Column("size", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("head", sa.String(64), nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("key", sa.String(160), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
    )
    sa.Table(
        "batches", m,
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("bureau", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("cards_digest", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("card_count", sa.Integer, nullable=False),
    )
    sa.Table(
        "batch_cards", m,
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.batch_id"), primary_key=True),
        sa.Column("card_ref", sa.String(64), primary_key=True),
        sa.Column("sequence", sa.Integer, nullable=False),
        sa.Column("city_code", sa.String(6), nullable=True),
        sa.Column("card_serial", sa.String(16), nullable=True),
        sa.Column("pan_sealed", sa.LargeBinary, nullable=True),
        sa.Column("pan_index", sa.String(64), nullable=True),
        sa.Column("pan_psn_index", sa.String(64), nullable=True),
        sa.Column("pan_masked", sa.String(19), nullable=True),
        sa.Column("psn", sa.String(2), nullable=True),
        sa.Column("kdd", sa.String(20), nullable=True),
        sa.Column("bound_fields", sa.String(64), nullable=True),
        sa.Column("chip_bound_at", sa.String(32), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("serial", sa.String(64), nullable=True),
        sa.Column("bundle", sa.LargeBinary, nullable=True),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("issued_at", sa.String(32), nullable=True),
        sa.UniqueConstraint("batch_id", "sequence", name="uq_batch_cards_sequence"),
        sa.Index("ix_batch_cards_card_ref", "card_ref"),
    )
    sa.Table(
        "card_events", m,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("card_ref", sa.String(64), nullable=False),
        sa.Column("event", sa.String(24), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("by", sa.String(200), nullable=True),
        sa.ForeignKeyConstraint(["batch_id", "card_ref"], ["batch_cards.batch_id", "batch_cards.card_ref"]),
        sa.Index("ix_card_events_card", "batch_id", "card_ref", "id"),
        sa.Index("ix_card_events_issued", "event", "at", "by"),
    )
    sa.Table(
        "card_lifecycle", m,
        sa.Column("card_ref", sa.String(64), primary_key=True),
        sa.Column("hrss_state", sa.String(16), nullable=False),
        sa.Column("bank_state", sa.String(16), nullable=False),
        sa.Column("replaced_by", sa.String(64), nullable=True, unique=True),
        sa.Column("replaces", sa.String(64), nullable=True, unique=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("changed_at", sa.String(32), nullable=False),
    )
    sa.Table(
        "card_lifecycle_events", m,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("card_ref", sa.String(64), nullable=False),
        sa.Column("application", sa.String(16), nullable=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("by", sa.String(200), nullable=False),
        sa.Index("ix_card_lifecycle_events_card", "card_ref", "id"),
    )
    sa.Table(
        "retired_identities", m,
        sa.Column("field", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(64), primary_key=True),
        sa.Column("shown", sa.String(40), nullable=True),
        sa.Column("card_ref", sa.String(64), nullable=False),
        sa.Column("retired_at", sa.String(32), nullable=False),
        sa.Column("retired_by", sa.String(200), nullable=False),
    )
    sa.Table(
        "limits", m,
        sa.Column("domain", sa.String(16), primary_key=True),
        sa.Column("scope", sa.String(16), primary_key=True),
        sa.Column("subject", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.Integer, nullable=False),
        sa.Column("ceremony_id", sa.String(64), nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
    )
    return m


def upgrade() -> None:
    schema().create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    schema().drop_all(op.get_bind(), checkfirst=False)
