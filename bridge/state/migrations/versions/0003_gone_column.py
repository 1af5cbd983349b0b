"""A study gone from the archive is marked in its own column (schema_info version 3).

Until now the marker was the word "gone" written over both fingerprints. ``studies.gone`` (not
null, server default false) takes its place; rows marked the old way are carried over, their
fingerprints left as they are (they match nothing either way).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_OLD_MARKER = "gone"
_studies = sa.table(
    "studies",
    sa.column("gone", sa.Boolean()),
    sa.column("qido_fingerprint", sa.String(64)),
    sa.column("resource_fingerprint", sa.String(64)),
)


def upgrade() -> None:
    """Add ``studies.gone`` and carry the old markers over; mark the store as schema version 3."""
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("gone", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(
        sa.update(_studies).where(_studies.c.qido_fingerprint == _OLD_MARKER).values(gone=sa.true())
    )
    op.execute("UPDATE schema_info SET version = 3 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 2: the marker goes back into the fingerprints."""
    op.execute("UPDATE schema_info SET version = 2 WHERE id = 1")
    op.execute(
        sa.update(_studies)
        .where(_studies.c.gone == sa.true())
        .values(qido_fingerprint=_OLD_MARKER, resource_fingerprint=_OLD_MARKER)
    )
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("gone")
