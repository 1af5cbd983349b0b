"""``bridge check``: try every configured peer once and say what to fix, in the order to fix it.

The archive first (QIDO-RS, and what it takes: includefield, gzip, UID lists; the Issuers of
Patient ID of a sample of its studies), then the FHIR server (a FHIR server at all, the writes the
write strategy needs, the bridge's credentials), the state store (opens, takes a write), and the
viewers. It writes one thing: each source's Endpoint, exactly as a sync's first step would.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from urllib.parse import urlsplit

import httpx

from bridge.config import PerSourceSettings, Settings, SourceSettings
from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.query import SeriesQuery
from bridge.errors import (
    BridgeError,
    ConfigurationError,
    MappingError,
    PatientLinkError,
    StoreError,
    UpstreamAuthError,
    UpstreamError,
)
from bridge.fhir.client import FhirClient
from bridge.mapping.context import MappingContext
from bridge.mapping.identifiers import patient_key
from bridge.mapping.records import parse_study
from bridge.mapping.validate import load_models
from bridge.resolve.viewers import configured_viewers
from bridge.runtime import mapping_context, open_connections
from bridge.state.store import SqlStore
from bridge.sync.policy import WriteStrategy
from bridge.sync.publisher import Publisher

NO_ISSUER = "(no issuer)"
# The placeholder system a PatientID without issuer gets until the operator names the MRN system.
DEFAULT_PATIENT_SYSTEM = PerSourceSettings.model_fields["patient_identifier_system"].default


class Severity(IntEnum):
    """What a finding costs, ordered as the exit codes of ``bridge sync`` (README)."""

    OK = 0
    PARKS = 1  # it works, but studies would be parked
    CONFIGURATION = 2
    UPSTREAM = 3
    STORE = 4


@dataclass
class Finding:
    """One line of the report: which peer, how bad, and what to do."""

    peer: str
    severity: Severity
    text: str
    note: bool = False  # worth knowing, nothing to fix

    def as_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {
            "peer": self.peer,
            "severity": self.severity.name.lower(),
            "note": self.note,
            "text": self.text,
        }


@dataclass
class Report:
    """Every finding in order, and the issuers sampled per source."""

    findings: list[Finding] = field(default_factory=list)
    issuers: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> issuer -> studies
    issuer_settings: dict[str, dict[str, str]] = field(default_factory=dict)  # source -> map to set

    def add(self, peer: str, severity: Severity, text: str, *, note: bool = False) -> None:
        """Record a finding."""
        self.findings.append(Finding(peer, severity, text, note))

    @property
    def worst(self) -> Severity:
        """The exit code: the worst finding's."""
        return max((f.severity for f in self.findings), default=Severity.OK)


def _upstream_problem(exc: UpstreamError, setting: str, what: str) -> tuple[Severity, str]:
    """How bad an upstream's failure is for ``bridge check``, and the setting to look at."""
    if isinstance(exc, UpstreamAuthError):
        return Severity.UPSTREAM, (
            f"{what} refused the bridge's credentials or TLS ({exc}); check "
            f"{setting.removesuffix('URL')}AUTH and the settings it needs (README, Connections)"
        )
    if exc.status is not None and 400 <= exc.status < 500:
        return Severity.CONFIGURATION, f"{what} answered {exc.status} ({exc}); check {setting}"
    return Severity.UPSTREAM, f"{what} does not answer ({exc}); check {setting} and that it is running"


async def check_archive(
    source: SourceSettings,
    dicomweb: DicomwebClient,
    ctx: MappingContext,
    sample: int,
    report: Report,
    *,
    in_entry: bool = False,
) -> None:
    """QIDO-RS answers; includefield, gzip and UID lists; the issuers of a sample of studies."""
    peer = f"archive {source.name}"
    setting = "BRIDGE_DICOMWEB_URL"
    try:
        found = await dicomweb.sample_studies(sample)
    except UpstreamError as exc:
        severity, text = _upstream_problem(exc, setting, f"the archive at {source.dicomweb.base}")
        if severity is Severity.CONFIGURATION:
            text += " (the DICOMweb base: the URL before /studies)"
        report.add(peer, severity, text)
        return
    report.add(
        peer, Severity.OK, f"QIDO-RS answers at {source.dicomweb.base} ({len(found.rows)} studies sampled)"
    )
    if not found.rows:
        report.add(peer, Severity.OK, "the archive holds no study yet: nothing to sample", note=True)
        return
    if found.includefield:
        report.add(peer, Severity.OK, "includefield is honoured")
    else:
        report.add(
            peer,
            Severity.OK,
            "no sampled row carries StudyDescription or IssuerOfPatientID though includefield asked for "
            "them: the archive may ignore includefield (set BRIDGE_READ_INSTANCE_HEADER=true to read them "
            "from instance headers)",
            note=True,
        )
    report.add(
        peer,
        Severity.OK,
        "answers gzip-compressed"
        if found.gzip
        else "answers uncompressed although gzip is asked (only slower)",
        note=not found.gzip,
    )
    await _uid_lists(peer, dicomweb, found.rows, report)
    _issuers(source, ctx, found.rows, report, in_entry)


async def _uid_lists(peer: str, dicomweb: DicomwebClient, rows: list[Any], report: Report) -> None:
    if dicomweb.series_query is not SeriesQuery.AUTO and dicomweb.series_query is not SeriesQuery.LIST:
        report.add(
            peer,
            Severity.OK,
            f"UID lists not tried (BRIDGE_DICOMWEB_SERIES_QUERY={dicomweb.series_query})",
            note=True,
        )
        return
    uids = [u for u in (_uid(row) for row in rows) if u][:5]
    if len(uids) < 2:
        report.add(peer, Severity.OK, "UID lists not tried (fewer than two studies sampled)", note=True)
        return
    try:
        await dicomweb.search_series_many(uids)
    except ConfigurationError as exc:  # series_query=list, and the archive does not match lists
        report.add(peer, Severity.CONFIGURATION, str(exc))
        return
    except UpstreamError as exc:
        report.add(
            peer,
            Severity.OK,
            f"the series query with a UID list failed ({exc}); series asked per study",
            note=True,
        )
        return
    if dicomweb.list_matching:
        report.add(peer, Severity.OK, "matches StudyInstanceUID lists: series are asked for a page at once")
    else:
        report.add(
            peer,
            Severity.OK,
            "does not match StudyInstanceUID lists: series are asked per study (slower, nothing to fix)",
            note=True,
        )


def _uid(row: Mapping[str, Any]) -> str | None:
    value = (row.get("0020000D") or {}).get("Value") or [None]
    return value[0] if isinstance(value[0], str) else None


def _issuers(
    source: SourceSettings, ctx: MappingContext, rows: list[Any], report: Report, in_entry: bool
) -> None:
    """Count the sampled studies per Issuer of Patient ID, and say which ones have no system.

    ``in_entry``: the source is a ``sources`` entry of the config file, where its map is set.
    """
    peer = f"archive {source.name}"
    counts: Counter[str] = Counter()
    unmapped: set[str] = set()
    unreadable: Counter[str] = Counter()
    for row in rows:
        try:
            study = parse_study(row)
        except MappingError as exc:
            unreadable[exc.attribute or "?"] += 1
            continue
        qualifier = study.patient_issuer_qualifier
        label = (
            study.patient_issuer
            or (qualifier.local or qualifier.universal if qualifier else None)
            or NO_ISSUER
        )
        counts[label] += 1
        try:
            patient_key(study, ctx)
        except PatientLinkError:
            unmapped.add(label)
        except MappingError as exc:
            unreadable[exc.attribute or "?"] += 1
    report.issuers[source.name] = dict(counts.most_common())
    for attribute, count in sorted(unreadable.items()):
        report.add(
            peer,
            Severity.PARKS,
            f"{count} sampled studies would be parked: {attribute} is missing or "
            "malformed (bridge sync --dry-run names each)",
        )
    listing = ", ".join(f"{issuer} ({n})" for issuer, n in counts.most_common())
    report.add(peer, Severity.OK, f"Issuers of Patient ID in the sample (studies): {listing}", note=True)
    if NO_ISSUER in counts and ctx.patient_system == DEFAULT_PATIENT_SYSTEM:
        report.add(
            peer,
            Severity.OK,
            f"{counts[NO_ISSUER]} sampled studies have no issuer: their PatientID gets "
            f"BRIDGE_PATIENT_IDENTIFIER_SYSTEM, still the placeholder {DEFAULT_PATIENT_SYSTEM}; set it to "
            "your MRN system",
            note=True,
        )
    if unmapped:
        wanted = {**ctx.patient_issuer_systems, **{i: f"<system of {i}>" for i in sorted(unmapped)}}
        report.issuer_settings[source.name] = wanted
        setting = (
            f"patient_issuer_systems of source {source.name!r}"
            if in_entry
            else "BRIDGE_PATIENT_ISSUER_SYSTEMS"
        )
        report.add(
            peer,
            Severity.PARKS,
            f"{sum(counts[i] for i in unmapped)} sampled studies would be parked: no identifier system for "
            f"{', '.join(sorted(unmapped))}; fill in {setting} (each issuer's system URI, e.g. urn:oid:...): "
            f"{json.dumps(wanted)}",
        )


async def check_fhir(settings: Settings, fhir: FhirClient, report: Report) -> bool:
    """A FHIR R4 server that takes the writes the strategy needs, and reads with the bridge's credentials."""
    peer = "FHIR server"
    try:
        statement = await fhir.capability_statement()
    except ConfigurationError as exc:
        report.add(peer, Severity.CONFIGURATION, str(exc))
        return False
    except UpstreamError as exc:
        report.add(
            peer, *_upstream_problem(exc, "BRIDGE_FHIR_URL", f"the FHIR server at {settings.fhir.base}")
        )
        return False
    version = str(statement.get("fhirVersion") or "")
    software = (statement.get("software") or {}).get("name") or "a FHIR server"
    if version and not version.startswith("4.0"):
        report.add(
            peer,
            Severity.CONFIGURATION,
            f"BRIDGE_FHIR_URL: {settings.fhir.base} speaks FHIR {version}; "
            "the bridge writes R4 (4.0.1): point it at the server's R4 base",
        )
        return False
    report.add(
        peer,
        Severity.OK,
        f"{software} answers at {settings.fhir.base} (FHIR {version or 'version not said'})",
    )
    _strategy(settings.write_strategy, statement, report)
    try:
        await fhir.search("ImagingStudy", {"_count": "1"})
    except UpstreamError as exc:
        report.add(peer, *_upstream_problem(exc, "BRIDGE_FHIR_URL", "the FHIR server's ImagingStudy search"))
        return False
    report.add(peer, Severity.OK, "searches ImagingStudy with the bridge's credentials")
    return True


def _strategy(strategy: WriteStrategy, statement: Mapping[str, Any], report: Report) -> None:
    """What the CapabilityStatement says of the writes BRIDGE_WRITE_STRATEGY makes."""
    resources = {
        str(entry.get("type")): entry
        for rest in statement.get("rest", []) or []
        if isinstance(rest, dict)
        for entry in rest.get("resource", []) or []
        if isinstance(entry, dict)
    }
    for kind in ("Endpoint", "ImagingStudy"):
        entry = resources.get(kind)
        if entry is None:
            continue  # many servers list nothing per type: the Endpoint write below tells
        codes = {i.get("code") for i in entry.get("interaction", []) or [] if isinstance(i, dict)}
        if codes and "update" not in codes:
            report.add(
                "FHIR server",
                Severity.CONFIGURATION,
                f"the server does not update {kind} (no 'update' "
                "interaction in its CapabilityStatement): it cannot hold the bridge's studies",
            )
        elif strategy is WriteStrategy.CLIENT_ID and entry.get("updateCreate") is False:
            report.add(
                "FHIR server",
                Severity.CONFIGURATION,
                f"BRIDGE_WRITE_STRATEGY=client-id: the server does "
                f"not create {kind} by PUT to a new id (updateCreate=false); set it to 'conditional'",
            )
        elif strategy is WriteStrategy.CONDITIONAL and entry.get("conditionalUpdate") is False:
            report.add(
                "FHIR server",
                Severity.CONFIGURATION,
                f"BRIDGE_WRITE_STRATEGY=conditional: the server does "
                f"not update {kind} conditionally (conditionalUpdate=false); set it to 'client-id'",
            )


def check_store(settings: Settings, report: Report) -> SqlStore | None:
    """The store opens (migrating it, as every command does) and takes a write."""
    try:
        store = SqlStore(settings.state_url)
    except StoreError as exc:
        report.add("state store", Severity.STORE, str(exc))
        return None
    try:
        store.check_writable()
    except StoreError as exc:
        report.add("state store", Severity.STORE, str(exc))
        store.close()
        return None
    report.add("state store", Severity.OK, "opens and takes a write")
    return store


async def check_endpoint(
    settings: Settings,
    source: SourceSettings,
    fhir: FhirClient,
    ctx: MappingContext,
    store: SqlStore,
    report: Report,
) -> None:
    """Write the source's Endpoint as a sync would first: the FHIR server takes the strategy's writes."""
    publisher = Publisher(fhir, store, ctx, write_strategy=settings.write_strategy)
    try:
        reference = await publisher.ensure_endpoint()
    except ConfigurationError as exc:
        report.add("FHIR server", Severity.CONFIGURATION, str(exc))
    except UpstreamError as exc:
        report.add("FHIR server", *_upstream_problem(exc, "BRIDGE_FHIR_URL", "writing the Endpoint"))
    except BridgeError as exc:
        report.add("FHIR server", Severity.CONFIGURATION, f"writing the Endpoint failed: {exc}")
    else:
        report.add(
            "FHIR server",
            Severity.OK,
            f"takes the writes of BRIDGE_WRITE_STRATEGY={settings.write_strategy} "
            f"(source {source.name}: {reference})",
        )


async def check_viewers(settings: Settings, report: Report) -> None:
    """The viewers offered, and whether each one's address answers."""
    try:
        viewers = configured_viewers(settings)
    except ConfigurationError as exc:
        report.add("viewers", Severity.CONFIGURATION, str(exc))
        return
    if not viewers:
        report.add(
            "viewers",
            Severity.OK,
            'no viewer is configured: "Open images" answers 409 until '
            'BRIDGE_VIEWER_URLS names one, e.g. BRIDGE_VIEWER_URLS=\'{"ohif": "https://viewer.example.org"}\'',
            note=True,
        )
        return
    async with httpx.AsyncClient(timeout=settings.http.timeout, follow_redirects=False) as client:
        for name, viewer in viewers.items():
            address = viewer.base_url or _origin(viewer.template)
            try:
                answer = await client.get(address)
            except httpx.HTTPError as exc:
                report.add(
                    f"viewer {name}",
                    Severity.UPSTREAM,
                    f"{address} does not answer ({type(exc).__name__}); "
                    "check BRIDGE_VIEWER_URLS and that the viewer runs",
                )
                continue
            if answer.status_code >= 500:
                report.add(
                    f"viewer {name}",
                    Severity.UPSTREAM,
                    f"{address} answered {answer.status_code}; check BRIDGE_VIEWER_URLS and the viewer",
                )
            else:
                report.add(f"viewer {name}", Severity.OK, f"{address} answers ({answer.status_code})")


def _origin(template: str) -> str:
    parts = urlsplit(template.split("{")[0])
    return f"{parts.scheme}://{parts.netloc}/"


async def run_checks(settings: Settings, sources: list[SourceSettings], sample: int) -> Report:
    """Every check, in the order to fix what they find: archives, FHIR server, store, viewers."""
    report = Report()
    load_models()
    # The Endpoint write goes through the store as a sync's does, so the store is opened first;
    # its findings are told after the FHIR server's, as what to fix comes in that order.
    store_report = Report()
    store = await asyncio.to_thread(check_store, settings, store_report)
    fhir_ok: bool | None = None
    try:
        async with open_connections(settings, sources) as connections:  # one client per upstream
            for clients in connections.sources:
                source = clients.source
                ctx = mapping_context(settings, source)
                await check_archive(
                    source, clients.dicomweb, ctx, sample, report, in_entry=bool(settings.sources)
                )
                if fhir_ok is None:
                    fhir_ok = await check_fhir(settings, connections.fhir, report)
                if fhir_ok and store is not None:
                    await check_endpoint(settings, source, connections.fhir, ctx, store, report)
                elif fhir_ok:
                    report.add(
                        "FHIR server",
                        Severity.OK,
                        "writes not tried: the state store does not open",
                        note=True,
                    )
        report.findings.extend(store_report.findings)
        await check_viewers(settings, report)
    finally:
        if store is not None:
            store.close()
    return report
