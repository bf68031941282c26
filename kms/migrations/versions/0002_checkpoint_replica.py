"""Which replica signed a checkpoint: ``audit_checkpoints.replica`` (the ``server.replica`` of the `kms serve` whose
checkpointer asked for it; NULL for checkpoints made before this revision).

Revision ID: 0002_checkpoint_replica
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_checkpoint_replica"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_checkpoints", sa.Column("replica", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_checkpoints") as batch:  # SQLite: the table copied without the column
        batch.drop_column("replica")
