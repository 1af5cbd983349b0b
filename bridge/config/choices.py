"""The choices settings offer (policies of the sync, mapping and archive queries), as enums.

They sit with the settings, at the bottom, so that the settings can be typed by them without
importing the layers that act on them; those layers name them from their own modules
(bridge/sync/policy.py, bridge/dicomweb/query.py, bridge/mapping/identity.py).
"""

from __future__ import annotations

from enum import StrEnum


class PatientPolicy(StrEnum):
    """How a study's subject is found or made."""

    MATCH_OR_CREATE = "match-or-create"
    MATCH_ONLY = "match-only"
    LOGICAL = "logical"


class MissingModality(StrEnum):
    """What a series without Modality (0008,0060), a Type 1 attribute, is published with."""

    OT = "ot"  # DICOM's "Other", with a warning counted in the run
    PARK = "park"  # the study is parked naming Modality


class DosePolicy(StrEnum):
    """What becomes of a study's radiation dose structured reports."""

    OBSERVATION = "observation"  # one Observation per dose report (HL7 Radiation Dose Summary)
    OFF = "off"  # published as an SR series only


class DeletePolicy(StrEnum):
    """What happens to the ImagingStudy of a study that is gone from the archive."""

    MARK = "mark"  # status entered-in-error
    DELETE = "delete"  # only resources the bridge wrote (meta.tag of this source)
    IGNORE = "ignore"  # left as it is; still recorded in the run


class ChangeSourceKind(StrEnum):
    """How each scheduled cycle finds what changed."""

    QIDO = "qido"  # a window of recent StudyDates, polled with QIDO-RS
    ORTHANC = "orthanc"  # Orthanc's /changes feed


class OrderPolicy(StrEnum):
    """How ImagingStudy.basedOn links the order (ServiceRequest) by accession number."""

    NONE = "none"  # no basedOn
    MATCH = "match"  # a reference to the one ServiceRequest with the accession; else none
    MATCH_OR_LOGICAL = "match-or-logical"  # else a logical reference by the accession identifier


class WriteStrategy(StrEnum):
    """How ImagingStudy and Endpoint writes are keyed on the FHIR server."""

    CLIENT_ID = "client-id"  # PUT to an id derived from the business identifier
    CONDITIONAL = "conditional"  # PUT Type?identifier=..., for servers refusing client ids


class DemographicsCheck(StrEnum):
    """What a study whose birth date, sex or family name disagrees with its Patient gets."""

    PARK = "park"  # parked naming the attribute, until corrected or accepted (bridge retry)
    WARN = "warn"  # published, counted in the run record and a metric
    OFF = "off"  # not compared


class SeriesQuery(StrEnum):
    """UID lists per page, one query per study, a sweep of the archive, or what the archive shows it does."""

    AUTO = "auto"  # UID-list matching if the archive answers the first list query right, else per study
    LIST = "list"  # one query per page: StudyInstanceUID=uid1,uid2,... (PS3.18 UID list matching)
    PER_STUDY = "per-study"  # one /studies/{uid}/series query per study
    # A whole-archive run sweeps /series at the root first (paged, kept on disk by study); other
    # runs, and studies the sweep cannot vouch for, are asked per study. For archives without lists.
    PAGED = "paged"


class UnmappedIssuer(StrEnum):
    """What a study whose Issuer of Patient ID has no system in the issuer map gets."""

    PARK = "park"  # parked, naming the attribute and the setting to add it to
    DERIVE = "derive"  # a system of its own, derived from the issuer: issuers never meet
    DEFAULT = "default"  # the default patient system: only for archives with one issuer
