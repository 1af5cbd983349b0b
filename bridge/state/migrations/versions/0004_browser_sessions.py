"""Browser sessions and logins under way, shared by every API replica (schema_info version 4).

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
    """Add ``browser_sessions``; mark the store as schema version 4."""
    op.create_table(
        "browser_sessions",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_browser_sessions_kind", "browser_sessions", ["kind"])
    op.create_index("ix_browser_sessions_expires_at", "browser_sessions", ["expires_at"])
    op.execute("UPDATE schema_info SET version = 4 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 3: sessions are forgotten (browsers log in again)."""
    op.execute("UPDATE schema_info SET version = 3 WHERE id = 1")
    op.drop_index("ix_browser_sessions_expires_at", "browser_sessions")
    op.drop_index("ix_browser_sessions_kind", "browser_sessions")
    op.drop_table("browser_sessions")
