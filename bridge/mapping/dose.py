"""A radiation dose structured report to one Observation (HL7 Radiation Dose Summary IG), as plain data.

The report's content tree (DICOM JSON from WADO-RS metadata) is searched for the summary values the
IG's RadiationDoseSummary profile lists as components, by their DCM concept names: CT's TID 10011
(accumulated DLP, and the highest Mean CTDIvol of its irradiation events, TID 10013), projection
X-ray's TID 10001 (dose-area product and dose at the reference point, TID 10004; mammography's
accumulated average glandular dose) and the radiopharmaceutical report's administered activity
(TID 10021). Each value keeps the UCUM unit the report gives it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bridge.mapping.context import (
    BRIDGE_TAG_SYSTEM,
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    MappingContext,
    resource_id,
)
from bridge.mapping.narrative import narrative, with_narrative
from bridge.mapping.records import DicomJson

Resource = dict[str, Any]

# PS3.4 Annex B: the dose report SOP classes.
DOSE_REPORT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.76": "Enhanced X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.68": "Radiopharmaceutical Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.73": "Patient Radiation Dose SR",
}
DOSE_REPORT_MODALITY = "SR"
UCUM_SYSTEM = "http://unitsofmeasure.org"
LOINC_SYSTEM = "http://loinc.org"
RADIATION_DOSE_SUMMARY = (
    "http://hl7.org/fhir/uv/radiation-dose-summary/StructureDefinition/radiation-dose-summary"
)
# The summary values taken as components (DCM code -> display), and how several values of one
# concept in a report (one per irradiation event) are summarised.
COMPONENTS = {
    "113813": "CT Dose Length Product Total",
    "113830": "Mean CTDIvol",
    "113722": "Dose Area Product Total",
    "113725": "Dose (RP) Total",
    "111637": "Accumulated Average Glandular Dose",
    "113730": "Total Fluoro Time",
    "113507": "Administered activity",
}
_HIGHEST = {"113830"}  # per event: the summary gives the highest (the others are totals, given once)
PROCEDURE_REPORTED = "121058"

_SOP_CLASS, _SOP_INSTANCE = "00080016", "00080018"
_CONCEPT_NAME, _CONCEPT_CODE = "0040A043", "0040A168"
_CONTENT = "0040A730"
_MEASURED = "0040A300"
_NUMERIC = "0040A30A"
_UNITS = "004008EA"
_CODE_VALUE, _SCHEME, _MEANING = "00080100", "00080102", "00080104"


def _first(item: DicomJson, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _items(item: DicomJson, tag: str) -> list[DicomJson]:
    return [v for v in (item.get(tag) or {}).get("Value") or [] if isinstance(v, dict)]


def _code(item: DicomJson, tag: str) -> tuple[str, str, str] | None:
    found = _items(item, tag)
    if not found:
        return None
    value, scheme = _first(found[0], _CODE_VALUE), _first(found[0], _SCHEME)
    if not isinstance(value, str) or not isinstance(scheme, str):
        return None
    return value, scheme, str(_first(found[0], _MEANING) or "")


def _walk(item: DicomJson) -> Iterator[DicomJson]:
    """Every content item below ``item``, depth first, in document order."""
    for child in _items(item, _CONTENT):
        yield child
        yield from _walk(child)


def sop_uid(dataset: DicomJson) -> str | None:
    """The SOP Instance UID in an instance's metadata."""
    value = _first(dataset, _SOP_INSTANCE)
    return value if isinstance(value, str) else None


def is_dose_report(dataset: DicomJson) -> bool:
    """Whether an instance's metadata is one of the four radiation dose SRs."""
    return _first(dataset, _SOP_CLASS) in DOSE_REPORT_CLASSES


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() and "." not in str(value) else number


def dose_values(report: DicomJson) -> dict[str, tuple[float | int, str]]:
    """The summary values of a dose report: DCM code -> (value, UCUM unit)."""
    values: dict[str, tuple[float | int, str]] = {}
    for item in _walk(report):
        concept = _code(item, _CONCEPT_NAME)
        if concept is None or concept[1] != "DCM" or concept[0] not in COMPONENTS:
            continue
        measured = _items(item, _MEASURED)
        if not measured:
            continue
        number = _number(_first(measured[0], _NUMERIC))
        unit = _code(measured[0], _UNITS)
        if number is None or unit is None or unit[1] != "UCUM":
            continue
        code = concept[0]
        if code in values and (code not in _HIGHEST or values[code][0] >= number):
            continue
        values[code] = (number, unit[0])
    return values


def _procedure(report: DicomJson) -> Resource | None:
    for item in _walk(report):
        concept = _code(item, _CONCEPT_NAME)
        value = _code(item, _CONCEPT_CODE)
        if concept is not None and concept[:2] == (PROCEDURE_REPORTED, "DCM") and value is not None:
            return {"value": value[0], "scheme": value[1], "meaning": value[2]}
    return None


def dose_observation_id(ctx: MappingContext, sop_uid: str) -> str:
    """The deterministic id of a dose report's Observation (from its SOP Instance UID)."""
    return resource_id("Observation", ctx.source_name, sop_uid)


def map_dose_observation(
    report: DicomJson,
    ctx: MappingContext,
    *,
    subject: Resource,
    study: Resource,
) -> Resource | None:
    """The Observation summarising one dose report, partOf the study's ImagingStudy; None if it has no value.

    ``study`` is the ImagingStudy as written (its id, identifier and ``started`` are used).
    """
    uid = sop_uid(report)
    values = dose_values(report)
    if uid is None or not values:
        return None
    title = _code(report, _CONCEPT_NAME)
    code: Resource = {
        "coding": [
            {
                "system": LOINC_SYSTEM,
                "code": "73569-6",
                "display": "Radiation exposure and protection information",
            }
        ]
    }
    if title is not None and title[1] == "DCM":
        code["coding"].append({"system": DCM_SYSTEM, "code": title[0], "display": title[2] or title[0]})
    components: list[Resource] = []
    procedure = _procedure(report)
    if procedure is not None:
        system = ctx.tables.coding_schemes.system(procedure["scheme"])
        coding: Resource = {"code": procedure["value"]}
        if system:
            coding = {"system": system, **coding}
        if procedure["meaning"]:
            coding["display"] = procedure["meaning"]
        components.append(
            {
                "code": {
                    "coding": [
                        {"system": DCM_SYSTEM, "code": PROCEDURE_REPORTED, "display": "Procedure reported"}
                    ]
                },
                "valueCodeableConcept": {"coding": [coding]},
            }
        )
    for concept, display in COMPONENTS.items():
        if concept in values:
            value, unit = values[concept]
            components.append(
                {
                    "code": {"coding": [{"system": DCM_SYSTEM, "code": concept, "display": display}]},
                    "valueQuantity": {"value": value, "unit": unit, "system": UCUM_SYSTEM, "code": unit},
                }
            )
    observation: Resource = {
        "resourceType": "Observation",
        "id": dose_observation_id(ctx, uid),
        # Declares the IG's profile so a consumer can find and check it (docs/conformance.md says how
        # the test suite's validator, which has no package of the IG, treats it).
        "meta": {
            "profile": [RADIATION_DOSE_SUMMARY],
            "tag": [{"system": BRIDGE_TAG_SYSTEM, "code": ctx.source_name}],
        },
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}],
        "partOf": [{"reference": f"ImagingStudy/{study['id']}"}],
        "status": "final",
        "code": code,
        "subject": subject,
    }
    if study.get("started"):
        observation["effectiveDateTime"] = study["started"]
    observation["component"] = components
    return with_narrative(observation, dose_narrative)


def _decimal(value: float | int) -> str:
    """A number as a report shows it: 100.0 as 100, 0.00012 as 0.00012."""
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def dose_narrative(resource: Resource) -> Resource:
    """The dose values with their units (no patient data)."""
    lines = []
    for component in resource.get("component", ()):
        name = component["code"]["coding"][0].get("display", "")
        if "valueQuantity" in component:
            quantity = component["valueQuantity"]
            lines.append(f"{name}: {_decimal(quantity['value'])} {quantity['unit']}")
        elif "valueCodeableConcept" in component:
            lines.append(f"{name}: {component['valueCodeableConcept']['coding'][0].get('display', '')}")
    return narrative("Radiation dose summary", lines)
