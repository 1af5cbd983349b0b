"""HAPI's FHIR instance validator over every resource the integration tests saw the bridge publish.

After each test, :class:`Collector` reads what the test's FHIR server holds of the types the bridge
writes and keeps the resources the bridge wrote (its ``meta.tag``), once per distinct content. At
the end of the session :func:`validate` hands them all to one JVM: ``ValidateResources`` in the
HAPI test server's jar (``tests/stack/hapi``; hapi-fhir-validation with the R4 definitions of
hapi-fhir-validation-resources-r4, base R4, no terminology server), which answers per resource.

A known-bad resource (:data:`CANARY`) goes with every batch and must come back with an error: a
validator that finds nothing because it checked nothing fails the check too.

Profiles the validator cannot load (:data:`UNLOADABLE_PROFILES`: no package of them on Maven
Central or npm) are reported by it as errors of the resource that declares them ("could not be
found"); those two messages, for exactly those canonicals, count as warnings, and a second canary
declaring another unknown profile must still come back with errors (docs/conformance.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bridge.mapping.context import BRIDGE_TAG_SYSTEM
from bridge.mapping.dose import RADIATION_DOSE_SUMMARY
from bridge.mapping.records import digest
from tests.stack.hapi import ensure_built
from tests.stack.process import require_tool

# What the bridge writes (Observation: the radiation dose summaries).
WRITTEN_TYPES = ("ImagingStudy", "Endpoint", "Patient", "Observation")
VALIDATOR_MAIN = "org.fhirdicomweb.hapitest.ValidateResources"
# One JVM for the whole batch: the C1 compiler starts it faster, and the definitions need ~0.5 GB.
JVM_OPTIONS = ("-Xmx1g", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
VALIDATE_TIMEOUT_SECONDS = 900.0
# An ImagingStudy without its required subject and with a status outside its required value set.
CANARY: dict[str, Any] = {"resourceType": "ImagingStudy", "id": "conformance-canary", "status": "bogus"}
# Profiles the bridge declares that the validator has no definition of: HL7's Radiation Dose Summary
# IG is published on packages.fhir.org only, not on Maven Central or npm.
UNLOADABLE_PROFILES = (RADIATION_DOSE_SUMMARY,)
# A resource declaring a profile no one defines: its unknown profile must stay an error.
PROFILE_CANARY: dict[str, Any] = {
    "resourceType": "Endpoint",
    "id": "conformance-profile-canary",
    "meta": {"profile": ["http://example.org/fhir/StructureDefinition/no-such-profile"]},
    "status": "active",
    "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    },
    "payloadType": [{"text": "DICOM"}],
    "address": "https://pacs.example/dicom-web",
}
# Elements the server keeps; they differ between two writes of the same content.
_SERVER_META = ("versionId", "lastUpdated", "source")


@dataclass(frozen=True)
class Issue:
    """One message of the validator."""

    severity: str  # fatal, error, warning, information
    location: str
    message: str

    def group(self) -> str:
        """The message without array positions and ids, to count like messages together."""
        location = re.sub(r"\[\d+\]", "[n]", self.location)
        return f"{location}: {self.message}"


@dataclass
class Checked:
    """A resource, the first test that published it, and what the validator said of it."""

    resource: dict[str, Any]
    test: str
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity in ("error", "fatal")]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]


def search_all(base_url: str, resource_type: str, **params: str) -> list[dict[str, Any]]:
    """Every resource of a type matching ``params``, across pages, never from a search cache."""
    url: str | None = f"{base_url}/{resource_type}"
    query: dict[str, str] | None = {"_count": "1000", **params}
    found: list[dict[str, Any]] = []
    while url is not None:
        response = httpx.get(url, params=query, headers={"Cache-Control": "no-cache"}, timeout=30)
        response.raise_for_status()
        bundle = response.json()
        found.extend(e["resource"] for e in bundle.get("entry", []))
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
        query = None
    return found


def _written_by_the_bridge(resource: dict[str, Any]) -> bool:
    tags = (resource.get("meta") or {}).get("tag") or []
    return any(t.get("system") == BRIDGE_TAG_SYSTEM for t in tags)


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without what the server keeps, so two writes of one content compare equal."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in _SERVER_META}
    out = {k: v for k, v in resource.items() if k != "meta"}
    if meta:
        out["meta"] = meta
    return out


class Collector:
    """The distinct resources the bridge published during the session, with the test that did."""

    def __init__(self) -> None:
        self._seen: dict[str, Checked] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def collect(self, base_url: str, test: str) -> None:
        """Keep what the bridge wrote among what the FHIR server at ``base_url`` holds now."""
        for kind in WRITTEN_TYPES:
            for resource in search_all(base_url, kind):
                if not _written_by_the_bridge(resource):
                    continue  # seeded by the test itself, or another writer's
                content = _content(resource)
                key = digest({k: v for k, v in content.items() if k != "id"})
                self._seen.setdefault(key, Checked(content, test))

    def checked(self) -> list[Checked]:
        return list(self._seen.values())


def validate(resources: Sequence[dict[str, Any]], *, jar: Path | None = None) -> list[list[Issue]]:
    """The validator's issues for each resource, in order, from one JVM."""
    java = require_tool("java", "the conformance check needs Java 17+ (and Maven to build its jar)")
    jar = jar or ensure_built()
    with tempfile.TemporaryDirectory(prefix="bridge-conformance-") as folder:
        given, answers = Path(folder) / "resources.ndjson", Path(folder) / "issues.ndjson"
        given.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in resources), "utf-8")
        result = subprocess.run(
            [
                java,
                *JVM_OPTIONS,
                f"-Dloader.main={VALIDATOR_MAIN}",
                "-cp",
                str(jar),
                "org.springframework.boot.loader.launch.PropertiesLauncher",
                str(given),
                str(answers),
            ],
            capture_output=True,
            text=True,
            timeout=VALIDATE_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0 or not answers.is_file():
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise RuntimeError(f"the FHIR validator exited with code {result.returncode}:\n{tail}")
        lines = [json.loads(line) for line in answers.read_text("utf-8").splitlines() if line.strip()]
    if len(lines) != len(resources):
        raise RuntimeError(f"the FHIR validator answered for {len(lines)} of {len(resources)} resources")
    return [
        [Issue(i["severity"], i.get("location") or "", i.get("message") or "") for i in line["issues"]]
        for line in lines
    ]


def check(collected: Iterable[Checked], *, jar: Path | None = None) -> list[Checked]:
    """Validate the collected resources (and the canary, which must fail); returns them with issues."""
    checked = list(collected)
    *issues, canary, profile_canary = validate(
        [c.resource for c in checked] + [CANARY, PROFILE_CANARY], jar=jar
    )
    if not any(i.severity in ("error", "fatal") for i in canary):
        raise RuntimeError("the FHIR validator found no error in a known-bad ImagingStudy: it checks nothing")
    if not any(i.severity in ("error", "fatal") for i in map(unloadable_as_warning, profile_canary)):
        raise RuntimeError(
            "an unknown profile was no error: the allowance for unloadable profiles is too wide"
        )
    for item, found in zip(checked, issues, strict=True):
        item.issues = [unloadable_as_warning(i) for i in found]
    return checked


def unloadable_as_warning(issue: Issue) -> Issue:
    """``issue`` as a warning if it only says a profile of :data:`UNLOADABLE_PROFILES` could not be found."""
    if issue.severity != "error":
        return issue
    for url in UNLOADABLE_PROFILES:
        if issue.message in (
            f"Profile reference '{url}' has not been checked because it could not be found",
            f"Invalid profile. Failed to retrieve profile with url={url}",
        ):
            return Issue("warning", issue.location, issue.message)
    return issue


def report(checked: Sequence[Checked]) -> str:
    """A plain-text summary: counts per type and severity, then each error and each kind of warning."""
    by_type = Counter(c.resource["resourceType"] for c in checked)
    errors = [(c, i) for c in checked for i in c.errors]
    warnings = Counter(f"{c.resource['resourceType']} {i.group()}" for c in checked for i in c.warnings)
    lines = [
        f"FHIR instance validator (HAPI, base R4): {len(checked)} distinct resources "
        f"({', '.join(f'{n} {t}' for t, n in sorted(by_type.items()))}), "
        f"{len(errors)} errors, {sum(warnings.values())} warnings",
    ]
    for item, issue in errors:
        lines.append(
            f"ERROR {item.resource['resourceType']}/{item.resource.get('id')} ({item.test}): "
            f"{issue.location}: {issue.message}"
        )
    for text, count in warnings.most_common():
        lines.append(f"warning x{count}: {text}")
    return "\n".join(lines)
