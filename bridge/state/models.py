"""The store's tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Bumped by every migration (bridge/state/migrations) so a bridge older than the store refuses it.
SCHEMA_VERSION = 9


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class SchemaInfo(Base):
    """One row: the schema version this database is at."""

    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class PublishedStudy(Base):
    """A study as last published: its fingerprints and where it lives on the FHIR server."""

    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_patient_id", "source", "patient_id"),)
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    qido_fingerprint: Mapped[str] = mapped_column(String(64))
    resource_fingerprint: Mapped[str] = mapped_column(String(64))
    fhir_id: Mapped[str] = mapped_column(String(64))
    fhir_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    first_synced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_synced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The last reconciliation run that saw the study in the archive (for finding deletes).
    last_seen_run: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The study's start as published (FHIR dateTime), for the sync-lag metric.
    started: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # Gone from the archive, its ImagingStudy retired and kept (the delete policy marked or left it).
    gone: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A digest of the (PatientID, IssuerOfPatientID) it was published under (null before 0007).
    patient_identity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Why it is withdrawn from clinicians (its ImagingStudy has the withdrawal extension); null if not.
    withdrawn: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The FHIR id of the Patient the ImagingStudy links to (null: logical subject, or published
    # before schema 8), to find the studies of a Patient the EHR merged into another.
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ParkedStudy(Base):
    """A study that could not be mapped or published, with the reason; retried every run."""

    __tablename__ = "failures"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    attribute: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    first_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=1)


class PatientCheck(Base):
    """A study the demographics cross-check parked, and whether the integrator accepted the link.

    Only attribute names are kept, never the values; the acceptance holds for this Patient only.
    """

    __tablename__ = "patient_checks"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(128), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    attributes: Mapped[str] = mapped_column(String(128))
    accepted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PublishedEndpoint(Base):
    """The source's Endpoint as last published."""

    __tablename__ = "endpoints"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    fhir_id: Mapped[str] = mapped_column(String(64))
    fhir_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Run(Base):
    """One sync run: when, how it went, its counts, and the exact QIDO queries it made."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="full")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    # Which process ran it (host:pid; the pod name on Kubernetes), to tell replicas apart.
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    seen: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    parked: Mapped[int] = mapped_column(Integer, default=0)
    deleted: Mapped[int] = mapped_column(Integer, default=0)
    # Studies skipped because another replica held their claim.
    claimed: Mapped[int] = mapped_column(Integer, default=0)
    fhir_writes: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    qido_queries: Mapped[list[str]] = mapped_column(JSON, default=list)
    # How series were asked for: "list" (UID-list matching) or "per-study"; null when none were.
    series_query: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # What the run did to studies gone from the archive: [{"study_uid", "action"}].
    deletions: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    # Studies whose rows all moved to another patient identity, re-linked: [{"study_uid", "action"}].
    relinked: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True, default=list)
    # What the run did to Patient links: [{"study_uid", "event", ...}] (attribute names, FHIR ids).
    patient_events: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True)
    # Why the run was made, when not on schedule: e.g. the change feed's gap it sweeps for.
    note: Mapped[str | None] = mapped_column(String(512), nullable=True)


class Checkpoint(Base):
    """A named position in a change source (e.g. Orthanc's /changes sequence, a backfill slice)."""

    __tablename__ = "checkpoints"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditBacklog(Base):
    """An AuditEvent recorded but not yet on the FHIR server (its id keeps a replay idempotent)."""

    __tablename__ = "audit_backlog"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    body: Mapped[str] = mapped_column(Text)  # the AuditEvent as R4 JSON
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class BrowserSession(Base):
    """A browser session, or a login under way, by the SHA-256 of its cookie value or OAuth state.

    Kept here so that every API replica knows every session; never a token, only who logged in.
    """

    __tablename__ = "browser_sessions"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # "session" | "login"
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    expires_at: Mapped[float] = mapped_column(Float, index=True)  # seconds since the epoch


class Push(Base):
    """A study an archive pushed (POST /studies/{uid}/sync), kept until it is synced.

    One row per study: pushes of a study already waiting join its row. Times are seconds since
    the epoch, as the API process saw them; ``received_at`` (the first push not yet done) is where
    the study's sync lag is measured from.
    """

    __tablename__ = "pushes"
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    requested_at: Mapped[float] = mapped_column(Float)  # the latest push: one after a sync began re-runs it
    not_before: Mapped[float] = mapped_column(Float, index=True)  # a failed sync waits until then
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(512), nullable=True)
