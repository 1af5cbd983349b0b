"""The state store's schema as bridge 0.1 made it with ``create_all`` (schema_info version 1), frozen.

Written out here, not imported from bridge.state.models, so it cannot follow later changes of the
models: it is what stores in the field look like before migrations existed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Column, DateTime, Engine, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

Table(
    "schema_info",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)
Table(
    "studies",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("study_uid", String(64), primary_key=True),
    Column("qido_fingerprint", String(64), nullable=False),
    Column("resource_fingerprint", String(64), nullable=False),
    Column("fhir_id", String(64), nullable=False),
    Column("fhir_version", String(64), nullable=True),
    Column("first_synced_at", DateTime(timezone=True), nullable=False),
    Column("last_synced_at", DateTime(timezone=True), nullable=False),
)
Table(
    "failures",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("study_uid", String(128), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("attribute", String(64), nullable=True),
    Column("reason", Text, nullable=False),
    Column("first_failed_at", DateTime(timezone=True), nullable=False),
    Column("last_failed_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False),
)
Table(
    "endpoints",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("fhir_id", String(64), nullable=False),
    Column("fhir_version", String(64), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("status", String(16), nullable=False),
    Column("seen", Integer, nullable=False),
    Column("created", Integer, nullable=False),
    Column("updated", Integer, nullable=False),
    Column("unchanged", Integer, nullable=False),
    Column("parked", Integer, nullable=False),
    Column("fhir_writes", Integer, nullable=False),
    Column("error", Text, nullable=True),
    Column("qido_queries", JSON, nullable=False),
)
Index("ix_runs_source", runs.c.source)

SOURCE = "legacy-pacs"
STUDY_UID = "1.2.826.0.1.3680043.10.9999.1"
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def create_legacy_store(engine: Engine) -> None:
    """A bridge 0.1 store holding one published study, one parked study, an endpoint and a run."""
    metadata.create_all(engine)
    t = metadata.tables
    with engine.begin() as connection:
        connection.execute(t["schema_info"].insert().values(id=1, version=1))
        connection.execute(
            t["studies"]
            .insert()
            .values(
                source=SOURCE,
                study_uid=STUDY_UID,
                qido_fingerprint="q" * 64,
                resource_fingerprint="r" * 64,
                fhir_id="study-1",
                fhir_version="3",
                first_synced_at=WHEN,
                last_synced_at=WHEN,
            )
        )
        connection.execute(
            t["failures"]
            .insert()
            .values(
                source=SOURCE,
                study_uid="1.2.3.bad",
                kind="mapping",
                attribute="StudyDate",
                reason="StudyDate is not a date",
                first_failed_at=WHEN,
                last_failed_at=WHEN,
                attempts=2,
            )
        )
        connection.execute(
            t["endpoints"]
            .insert()
            .values(
                source=SOURCE, fingerprint="e" * 64, fhir_id="endpoint-1", fhir_version="1", updated_at=WHEN
            )
        )
        connection.execute(
            t["runs"]
            .insert()
            .values(
                source=SOURCE,
                kind="full",
                started_at=WHEN,
                finished_at=WHEN,
                status="parked",
                seen=2,
                created=1,
                updated=0,
                unchanged=0,
                parked=1,
                fhir_writes=2,
                error=None,
                qido_queries=["/studies?limit=100&offset=0"],
            )
        )
