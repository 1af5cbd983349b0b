"""Each run records which way it asked the archive for series (schema_info version 6).

``runs.series_query`` (nullable): ``list`` (UID-list matching, the series of a page of studies
in one query), ``per-study`` (one query per study), or null for a run that asked for no series
(nothing changed) and for runs recorded before this revision. The exact queries stay in
``runs.qido_queries``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``runs.series_query``; mark the store as schema version 6."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("series_query", sa.String(16), nullable=True))
    op.execute("UPDATE schema_info SET version = 6 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 5: the column goes (the queries themselves stay in qido_queries)."""
    op.execute("UPDATE schema_info SET version = 5 WHERE id = 1")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("series_query")
