"""Browser sessions and logins under way, shared by every API replica (schema_info version 5).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``browser_sessions``; mark the store as schema version 5."""
    op.create_table(
        "browser_sessions",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_browser_sessions_kind", "browser_sessions", ["kind"])
    op.create_index("ix_browser_sessions_expires_at", "browser_sessions", ["expires_at"])
    op.execute("UPDATE schema_info SET version = 5 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 4: sessions are forgotten (browsers log in again)."""
    op.execute("UPDATE schema_info SET version = 4 WHERE id = 1")
    op.drop_index("ix_browser_sessions_expires_at", "browser_sessions")
    op.drop_index("ix_browser_sessions_kind", "browser_sessions")
    op.drop_table("browser_sessions")
