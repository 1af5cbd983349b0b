"""Business identifiers: Study Instance UID, accession number, PatientID, each with its system."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.errors import MappingError, PatientLinkError
from bridge.mapping.context import DICOM_UID_SYSTEM, V2_0203, MappingContext
from bridge.mapping.identity import UnmappedIssuer, derived_system
from bridge.mapping.records import Issuer, StudyRecord
from bridge.mapping.uid import archive_uid
from bridge.mapping.values import vr_problem


@dataclass(frozen=True, slots=True)
class PatientKey:
    """The identifier a Patient is linked by: (system, PatientID)."""

    system: str
    value: str

    def search(self) -> str:
        r"""The token search value, with FHIR search escaping of ``|`` ``,`` ``$`` and ``\\``."""
        return identifier_search(self.as_identifier())

    def as_identifier(self) -> dict[str, str]:
        """The FHIR Identifier."""
        return {"system": self.system, "value": self.value}


def escape_token(text: str) -> str:
    r"""A value escaped for a FHIR token search (``\``, ``|``, ``,`` and ``$``)."""
    for char in ("\\", "|", ",", "$"):
        text = text.replace(char, "\\" + char)
    return text


def identifier_search(identifier: dict[str, str]) -> str:
    """A FHIR Identifier as a token search value (``system|value``), escaped per the FHIR search rules."""
    return f"{escape_token(identifier['system'])}|{escape_token(identifier['value'])}"


def check_uid(value: str, attribute: str) -> str:
    """The UID, trimmed of archive padding, when valid; else a MappingError naming the attribute."""
    uid = archive_uid(value)
    if uid is None:
        raise MappingError(f"{attribute} is not a valid DICOM UID", attribute=attribute)
    return uid


def study_identifier(study_uid: str) -> dict[str, str]:
    """The ImagingStudy identifier for a Study Instance UID."""
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}


def study_search(study_uid: str) -> str:
    """Token search for the ImagingStudy of a Study Instance UID."""
    return f"{DICOM_UID_SYSTEM}|urn:oid:{study_uid}"


def issuer_system(
    issuer: str | None,
    qualifier: Issuer | None,
    systems: dict[str, str],
    default: str | None,
    unmapped: UnmappedIssuer = UnmappedIssuer.DEFAULT,
) -> str | None:
    """The identifier system for an issuer of patient ids.

    Looked up in ``systems`` by Issuer of Patient ID, then by the qualifier's local and universal
    entity ids; an ISO OID qualifier not in the map becomes ``urn:oid:<oid>``. No issuer at all
    gives ``default``. An issuer that is present but unmapped is handled per ``unmapped``: the
    default system (``default``), a system derived from the issuer (``derive``), or PatientLinkError
    (``park``), so that two issuers never share a system by accident.
    """
    for key in (issuer, qualifier.local if qualifier else None, qualifier.universal if qualifier else None):
        if key is not None and key in systems:
            return systems[key]
    if qualifier is not None and qualifier.universal and qualifier.universal_type == "ISO":
        return iso_system(qualifier.universal, "IssuerOfPatientIDQualifiersSequence.UniversalEntityID")
    named = issuer or (qualifier.local or qualifier.universal if qualifier else None)
    if named is None or unmapped is UnmappedIssuer.DEFAULT:
        return default
    if unmapped is UnmappedIssuer.DERIVE:
        if len(named) > MAX_DERIVED_ISSUER:  # the entity ids are UT: unbounded in DICOM
            raise PatientLinkError(
                f"the issuer of the PatientID is longer than {MAX_DERIVED_ISSUER} characters: no "
                "system is derived from it; map it in BRIDGE_PATIENT_ISSUER_SYSTEMS",
                attribute="IssuerOfPatientIDQualifiersSequence",
            )
        return derived_system(named)
    attribute = "IssuerOfPatientID" if issuer else "IssuerOfPatientIDQualifiersSequence"
    raise PatientLinkError(
        f"{attribute} has no identifier system in BRIDGE_PATIENT_ISSUER_SYSTEMS "
        "(BRIDGE_UNMAPPED_ISSUER=park): add the issuer and its system to BRIDGE_PATIENT_ISSUER_SYSTEMS, "
        "or set BRIDGE_UNMAPPED_ISSUER=derive; the study is retried on the next run",
        attribute=attribute,
    )


# Longest issuer a system is derived from (IssuerOfPatientID is LO, at most 64 characters).
MAX_DERIVED_ISSUER = 64


def iso_system(oid: str, attribute: str) -> str:
    """``urn:oid:<oid>`` for an ISO universal entity id, which must then be a valid OID."""
    if vr_problem(oid, "UI") is not None:
        raise MappingError(f"{attribute} is of type ISO but not a valid OID", attribute=attribute)
    return f"urn:oid:{oid}"


def patient_key(study: StudyRecord, ctx: MappingContext) -> PatientKey:
    """PatientID with the system mapped from its issuer (see issuer_system)."""
    if study.patient_id is None:
        raise MappingError("PatientID is missing", attribute="PatientID")
    system = issuer_system(
        study.patient_issuer,
        study.patient_issuer_qualifier,
        ctx.patient_issuer_systems,
        ctx.patient_system,
        ctx.unmapped_issuer,
    )
    return PatientKey(system=system or ctx.patient_system, value=study.patient_id)


def other_patient_identifiers(study: StudyRecord, ctx: MappingContext) -> list[dict[str, str]]:
    """Identifiers from Other Patient IDs Sequence whose issuer maps to a system.

    The others are left out (an identifier without a known system would link nothing), unless
    the policy derives systems for unmapped issuers.
    """
    derive = UnmappedIssuer.DERIVE if ctx.unmapped_issuer is UnmappedIssuer.DERIVE else UnmappedIssuer.DEFAULT
    identifiers = []
    for other in study.other_patient_ids:
        system = issuer_system(other.issuer, other.qualifier, ctx.patient_issuer_systems, None, derive)
        if system is not None:
            identifiers.append({"system": system, "value": other.value})
    return identifiers


def _accession_system(issuer: Issuer | None, ctx: MappingContext) -> str | None:
    if issuer is not None:
        for key in (issuer.local, issuer.universal):
            if key is not None and key in ctx.accession_issuer_systems:
                return ctx.accession_issuer_systems[key]
        if issuer.universal and issuer.universal_type == "ISO":
            return iso_system(issuer.universal, "IssuerOfAccessionNumberSequence.UniversalEntityID")
    return ctx.accession_system


def accession_identifiers(study: StudyRecord, ctx: MappingContext) -> list[dict[str, object]]:
    """One Identifier of type ACSN per accession number of the study (none when it has none).

    Archives that file one study under several orders send AccessionNumber with several values:
    each becomes an identifier of its own, all in the issuer's system.
    """
    if not study.accessions:
        return []
    system = _accession_system(study.accession_issuer, ctx)
    identifiers: list[dict[str, object]] = []
    for value in study.accessions:
        identifier: dict[str, object] = {
            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
            "value": value,
        }
        if system is not None:
            identifier["system"] = system
        identifiers.append(identifier)
    return identifiers
