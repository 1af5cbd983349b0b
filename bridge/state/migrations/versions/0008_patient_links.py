"""The Patient link: demographics checks, accepted overrides, linked Patients, run events (schema 8).

* ``patient_checks``: one row per study the demographics cross-check parked: the FHIR id of the
  Patient it was compared with, the attribute names that disagreed (never values), and whether the
  integrator accepted the link (``bridge retry --study UID --accept-demographics``).
* ``studies.patient_id``: the FHIR id of the Patient a published study links to, so a Patient
  merged on the FHIR server can be traced to its studies (null for studies published before).
* ``runs.patient_events``: what a run did to Patient links (``[{"study_uid", "event", ...}]``):
  demographics warnings, accepted overrides, re-links after a merge.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the table and the two columns; mark the store as schema version 8."""
    op.create_table(
        "patient_checks",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(128), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("attributes", sa.String(128), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_id", sa.String(64), nullable=True))
        batch.create_index("ix_studies_patient_id", ["source", "patient_id"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("patient_events", sa.JSON(), nullable=True))
    op.execute("UPDATE schema_info SET version = 8 WHERE id = 1")


def downgrade() -> None:
    """Back to schema version 7: the table and columns go (accepted overrides are forgotten)."""
    op.execute("UPDATE schema_info SET version = 7 WHERE id = 1")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("patient_events")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_patient_id")
        batch.drop_column("patient_id")
    op.drop_table("patient_checks")
