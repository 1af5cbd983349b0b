"""Studies remember the patient identity they were published under, and a withdrawal (schema_info version 7).

``studies.patient_identity`` (nullable): a digest of the (PatientID, IssuerOfPatientID) the study
was last published under, so that a row naming another identity is checked against every row of
its Study Instance UID before the study moves (a correction) or is withdrawn (a conflict); null
for studies published before this revision. ``studies.withdrawn`` (nullable): why a published
study is withdrawn from clinicians (``conflicting patient identity``), null when it is not.
``runs.relinked``: the studies a run moved to another patient identity because all of their rows
did (``[{"study_uid", "action"}]``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the identity and withdrawal columns; mark the store as schema version 7."""
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_identity", sa.String(64), nullable=True))
        batch.add_column(sa.Column("withdrawn", sa.String(128), nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("relinked", sa.JSON(), nullable=True))
    op.execute("UPDATE schema_info SET version = 7 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 6: the columns go (a withdrawn study is re-examined by its next run)."""
    op.execute("UPDATE schema_info SET version = 6 WHERE id = 1")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("relinked")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("withdrawn")
        batch.drop_column("patient_identity")
