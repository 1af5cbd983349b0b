"""The audit backlog: AuditEvents kept until the FHIR server has them (schema_info version 4).

Adds the table ``audit_backlog``; nothing existing changes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the table; mark the store as schema version 4."""
    op.create_table(
        "audit_backlog",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    )
    op.execute("UPDATE schema_info SET version = 4 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 3 (AuditEvents not yet written are lost)."""
    op.execute("UPDATE schema_info SET version = 3 WHERE id = 1")
    op.drop_table("audit_backlog")
