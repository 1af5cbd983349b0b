"""Pushed studies wait in the state store until they are synced; runs say why (schema_info version 9).

``pushes``: one row per study an archive pushed (``POST /studies/{uid}/sync``) and not yet
synced: when the first waiting push arrived, the latest one, when a failed sync may be tried
again, how many tries failed and why. A push is recorded here before it is answered, so a
crash or a restart loses none; every replica sees the same queue.

``runs.note`` (nullable): why a run was made when not on schedule, e.g. the gap in the archive's
change feed that a ``feed-gap`` sweep covers.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``pushes`` and ``runs.note``; mark the store as schema version 9."""
    op.create_table(
        "pushes",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("requested_at", sa.Float(), nullable=False),
        sa.Column("not_before", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(512), nullable=True),
    )
    op.create_index("ix_pushes_received_at", "pushes", ["received_at"])
    op.create_index("ix_pushes_not_before", "pushes", ["not_before"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("note", sa.String(512), nullable=True))
    op.execute("UPDATE schema_info SET version = 9 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 8: waiting pushes (the next sweep finds their studies) and notes go."""
    op.execute("UPDATE schema_info SET version = 8 WHERE id = 1")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("note")
    op.drop_index("ix_pushes_not_before", "pushes")
    op.drop_index("ix_pushes_received_at", "pushes")
    op.drop_table("pushes")
