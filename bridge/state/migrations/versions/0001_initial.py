"""The schema of bridge 0.1 as ``create_all`` made it (schema_info version 1).

A store created before migrations existed is at this revision already: ``bridge.state.migrate``
stamps it instead of running this script, so nothing in it is touched.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the five tables of schema version 1."""
    schema_info = op.create_table(
        "schema_info",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
    )
    op.create_table(
        "studies",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("qido_fingerprint", sa.String(64), nullable=False),
        sa.Column("resource_fingerprint", sa.String(64), nullable=False),
        sa.Column("fhir_id", sa.String(64), nullable=False),
        sa.Column("fhir_version", sa.String(64), nullable=True),
        sa.Column("first_synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "failures",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("attribute", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
    )
    op.create_table(
        "endpoints",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("fhir_id", sa.String(64), nullable=False),
        sa.Column("fhir_version", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("seen", sa.Integer(), nullable=False),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("updated", sa.Integer(), nullable=False),
        sa.Column("unchanged", sa.Integer(), nullable=False),
        sa.Column("parked", sa.Integer(), nullable=False),
        sa.Column("fhir_writes", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("qido_queries", sa.JSON(), nullable=False),
    )
    op.create_index("ix_runs_source", "runs", ["source"])
    op.bulk_insert(schema_info, [{"id": 1, "version": 1}])


def downgrade() -> None:
    """Drop everything (the store is empty afterwards)."""
    op.drop_index("ix_runs_source", table_name="runs")
    for table in ("runs", "endpoints", "failures", "studies", "schema_info"):
        op.drop_table(table)
