"""Change tracking (checkpoints, deletes, sync lag) and replica bookkeeping (schema_info version 2).

Adds ``checkpoints``; ``studies.last_seen_run`` and ``studies.started``; ``runs.worker``,
``runs.deleted``, ``runs.claimed`` and ``runs.deletions``. Every new column is nullable or has a
server default, so existing rows stay valid and nothing is rewritten on PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the new table and columns; mark the store as schema version 2."""
    op.create_table(
        "checkpoints",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("last_seen_run", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("started", sa.String(40), nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("worker", sa.String(128), nullable=True))
        batch.add_column(sa.Column("deleted", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("claimed", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("deletions", sa.JSON(), nullable=False, server_default="[]"))
    op.execute("UPDATE schema_info SET version = 2 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 1 (checkpoints and the new run columns are lost)."""
    op.execute("UPDATE schema_info SET version = 1 WHERE id = 1")
    with op.batch_alter_table("runs") as batch:
        for column in ("deletions", "claimed", "deleted", "worker"):
            batch.drop_column(column)
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("started")
        batch.drop_column("last_seen_run")
    op.drop_table("checkpoints")
