"""Sample DICOM studies for the tests, built with pydicom and stored over STOW-RS.

A test describes what it needs with :class:`StudySpec` / :class:`SeriesSpec` and calls
:func:`build_study` (datasets in memory) and :func:`stow` (store them in an archive).  The
images are small (64x64 grey) but the headers are complete: SOP class matching the modality,
patient, study, series and image modules, and a proper Part 10 file meta header in Explicit VR
Little Endian.

Specs may be invalid on purpose, to exercise the bridge's handling of bad input: a
``patient_id`` of None leaves Patient ID out, and any UID or date given explicitly is written
as given (pydicom's value validation is switched off while building).

UIDs left as None are derived from the Study Instance UID, so a study whose UID is fixed
always produces the same series and instance UIDs; :func:`demo_studies` uses fixed UIDs, so
loading the demo twice stores the same studies.
"""

from __future__ import annotations

import array
import contextlib
import io
import math
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

IMAGE_SIZE = 64

# SOP Class UIDs (PS3.4 Annex B) per modality; anything else is stored as Secondary Capture.
SOP_CLASS_BY_MODALITY: dict[str, str] = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Pres.
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "NM": "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

DEMO_ENTROPY = "fhir-dicomweb-bridge/tests/demo"
STOW_ACCEPT = "application/dicom+json"

# DICOM JSON keywords of the STOW-RS response (PS3.18 Table 10.5.3-1)
TAG_FAILED_SOP_SEQUENCE = "00081198"
TAG_REFERENCED_SOP_SEQUENCE = "00081199"
TAG_FAILURE_REASON = "00081197"
TAG_REFERENCED_SOP_INSTANCE_UID = "00081155"


@dataclass
class SeriesSpec:
    """One series of a sample study."""

    modality: str = "CT"
    description: str = ""
    body_part: str | None = None  # BodyPartExamined, e.g. "CHEST"
    laterality: str | None = None  # "L" / "R": series Laterality (and ImageLaterality for MG/DX/CR)
    instances: int = 2
    number: int | None = None  # SeriesNumber; None -> position in the study, from 1
    uid: str | None = None  # None -> derived from the study UID by build_study


@dataclass
class StudySpec:
    """One sample study.  ``None`` in a type 2 attribute writes it empty, except Patient ID."""

    patient_id: str | None = "PAT001"  # None -> Patient ID absent
    patient_name: str = "Doe^Jane"
    issuer: str | None = None  # Issuer of Patient ID (0010,0021)
    birth_date: str | None = "19700101"
    sex: str | None = "F"
    accession: str | None = None
    accession_issuer: str | None = None  # IssuerOfAccessionNumberSequence LocalNamespaceEntityID
    study_date: str | None = "20240102"
    study_time: str | None = "101500"
    tz_offset: str | None = None  # TimezoneOffsetFromUTC, e.g. "+0100"
    description: str = ""
    series: list[SeriesSpec] = field(default_factory=lambda: [SeriesSpec()])
    uid: str | None = None  # None -> a new random UID chosen by build_study
    charset: str | None = None  # None -> chosen from the text (see choose_charset)
    referring_physician: str = "Smith^Anna^^Dr"
    study_id: str | None = "1"
    institution: str | None = "Bridge Test Hospital"


class StowError(RuntimeError):
    """A STOW-RS request failed entirely or for some instances."""

    def __init__(self, message: str, status_code: int, failed_uids: list[str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.failed_uids = failed_uids or []


def choose_charset(*texts: str) -> str | None:
    """Specific Character Set for these strings: None (ASCII), ISO_IR 100 or ISO_IR 192."""
    joined = "".join(texts)
    if joined.isascii():
        return None
    try:
        joined.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


@contextlib.contextmanager
def _lenient_values() -> Iterator[None]:
    """Let deliberately invalid values (UIDs, dates) through pydicom without warnings."""
    settings = pydicom_config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = pydicom_config.IGNORE
    settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def _derived_uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(part) for part in parts])


def _pixels(series_index: int, instance_index: int, bits: int) -> bytes:
    """A diagonal gradient with a bright ring whose radius changes per instance."""
    size = IMAGE_SIZE
    top = (1 << bits) - 1 if bits == 8 else 4095
    radius = 10 + (instance_index * 5 + series_index * 3) % 18
    values = array.array("B" if bits == 8 else "H")
    centre = (size - 1) / 2
    for row in range(size):
        for col in range(size):
            value = (row + col) * top // (2 * (size - 1)) // 2
            if abs(math.hypot(row - centre, col - centre) - radius) < 1.5:
                value = top
            values.append(value)
    if bits == 16 and sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _add_image_module(ds: Dataset, modality: str, bits: int, series_index: int, index: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = IMAGE_SIZE
    ds.Columns = IMAGE_SIZE
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if bits == 16:
        # in output units: HU for CT (rescaled by -1024), stored values otherwise
        ds.WindowCenter = 0 if modality == "CT" else 1024
        ds.WindowWidth = 2048
    ds.PixelData = _pixels(series_index, index, bits)
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"


def _add_modality_attributes(ds: Dataset, series: SeriesSpec, index: int, frame_uid: str) -> None:
    """Attributes the modality's IOD requires beyond the general modules."""
    modality = series.modality
    if modality in ("CT", "MR", "PT", "NM"):
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-160.0, -160.0, -10.0 * index]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [5.0, 5.0]
        ds.SliceThickness = 5.0
        ds.SliceLocation = -10.0 * index
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.ConvolutionKernel = "B30f"
    elif modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500.0
        ds.EchoTime = 15.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.ImagedNucleus = "1H"
    elif modality in ("CR", "DX", "MG"):
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationLUTShape = "IDENTITY"
        ds.ImagerPixelSpacing = [0.5, 0.5]
        ds.PixelSpacing = [0.5, 0.5]
        ds.PatientOrientation = ["A", "F"] if modality == "MG" else ["L", "F"]
        if modality in ("DX", "MG"):
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.BurnedInAnnotation = "NO"
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.RescaleType = "US"
            ds.DetectorType = "DIRECT"
            ds.ImageLaterality = series.laterality or "U"
        if modality == "MG":
            ds.ViewPosition = "CC" if index % 2 else "MLO"
            ds.BreastImplantPresent = "NO"
            ds.PartialView = "NO"
        elif modality == "CR":
            ds.ViewPosition = "PA" if index % 2 else "LL"
        if series.laterality and modality == "CR":
            ds.ImageLaterality = series.laterality
    elif modality == "US":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    else:
        ds.ConversionType = "WSD"
        ds.ImageType = ["DERIVED", "SECONDARY"]


def build_study(spec: StudySpec) -> list[Dataset]:
    """Build every instance of the study described by ``spec``.

    Fills ``spec.uid`` and each ``SeriesSpec.uid`` left as None, so the caller knows them.
    """
    if spec.uid is None:
        spec.uid = generate_uid()
    study_uid = spec.uid
    charset = spec.charset
    if charset is None:
        texts = [spec.patient_name, spec.description, spec.referring_physician, spec.institution or ""]
        texts += [series.description for series in spec.series]
        charset = choose_charset(*texts)
    frame_uid = _derived_uid(study_uid, "frame-of-reference")

    datasets: list[Dataset] = []
    with _lenient_values():
        for series_index, series in enumerate(spec.series):
            if series.uid is None:
                series.uid = _derived_uid(study_uid, "series", series_index)
            if series.number is None:
                series.number = series_index + 1
            modality = series.modality.upper()
            sop_class = SOP_CLASS_BY_MODALITY.get(modality, SECONDARY_CAPTURE)
            bits = 8 if modality == "US" else 16
            for index in range(1, series.instances + 1):
                sop_uid = _derived_uid(study_uid, "instance", series.uid, index)
                ds = Dataset()
                ds.file_meta = _file_meta(sop_class, sop_uid)
                if charset:
                    ds.SpecificCharacterSet = charset
                # SOP Common
                ds.SOPClassUID = sop_class
                ds.SOPInstanceUID = sop_uid
                ds.InstanceCreationDate = spec.study_date or ""
                ds.InstanceCreationTime = spec.study_time or ""
                if spec.tz_offset is not None:
                    ds.TimezoneOffsetFromUTC = spec.tz_offset
                # Patient
                ds.PatientName = spec.patient_name
                if spec.patient_id is not None:
                    ds.PatientID = spec.patient_id
                if spec.issuer is not None:
                    ds.IssuerOfPatientID = spec.issuer
                    ds.TypeOfPatientID = "TEXT"
                ds.PatientBirthDate = spec.birth_date or ""
                ds.PatientSex = spec.sex or ""
                # General Study
                ds.StudyInstanceUID = study_uid
                ds.StudyDate = spec.study_date or ""
                ds.StudyTime = spec.study_time or ""
                ds.ReferringPhysicianName = spec.referring_physician
                ds.StudyID = spec.study_id or ""
                ds.AccessionNumber = spec.accession or ""
                if spec.accession_issuer is not None:
                    issuer_item = Dataset()
                    issuer_item.LocalNamespaceEntityID = spec.accession_issuer
                    ds.IssuerOfAccessionNumberSequence = [issuer_item]
                ds.StudyDescription = spec.description
                # General Series
                ds.Modality = modality
                ds.SeriesInstanceUID = series.uid
                ds.SeriesNumber = series.number
                ds.SeriesDescription = series.description
                ds.SeriesDate = spec.study_date or ""
                ds.SeriesTime = spec.study_time or ""
                if series.body_part is not None:
                    ds.BodyPartExamined = series.body_part
                if series.laterality is not None:
                    ds.Laterality = series.laterality
                # General Equipment
                ds.Manufacturer = "FHIR-DICOMweb bridge tests"
                ds.ManufacturerModelName = "pydicom sample generator"
                if spec.institution is not None:
                    ds.InstitutionName = spec.institution
                # General Image / Acquisition
                ds.InstanceNumber = index
                ds.ContentDate = spec.study_date or ""
                ds.ContentTime = spec.study_time or ""
                ds.AcquisitionDate = spec.study_date or ""
                ds.AcquisitionTime = spec.study_time or ""
                _add_modality_attributes(ds, series, index, frame_uid)
                _add_image_module(ds, modality, bits, series_index, index)
                datasets.append(ds)
    return datasets


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BRIDGE_TESTS"
    return meta


def to_part10(ds: Dataset) -> bytes:
    """Encode one dataset as a DICOM Part 10 file (preamble, file meta, Explicit VR LE)."""
    buffer = io.BytesIO()
    with _lenient_values():
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    chunks: list[bytes] = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"))
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks)


def _sequence_items(answer: object, tag: str) -> list[dict[str, object]]:
    if not isinstance(answer, dict):
        return []
    element = answer.get(tag)
    if not isinstance(element, dict):
        return []
    items = element.get("Value")
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _first_value(item: dict[str, object], tag: str) -> object:
    element = item.get(tag)
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values:
            return values[0]
    return None


def stow(
    dicomweb_url: str,
    datasets: Sequence[Dataset],
    client: httpx.Client | None = None,
) -> None:
    """Store the datasets with one STOW-RS ``POST {dicomweb_url}/studies``.

    Raises :class:`StowError` on an HTTP error and on a success status whose answer lists
    failed instances in Failed SOP Sequence (0008,1198).
    """
    if not datasets:
        return
    boundary = f"bridge-stow-{uuid.uuid4().hex}"
    body = _multipart_body([to_part10(ds) for ds in datasets], boundary)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": STOW_ACCEPT,
    }
    url = dicomweb_url.rstrip("/") + "/studies"
    own_client = client is None
    http = client or httpx.Client(timeout=60.0)
    try:
        response = http.post(url, content=body, headers=headers)
    finally:
        if own_client:
            http.close()
    answer: object = None
    if response.content:
        try:
            answer = response.json()
        except ValueError:
            answer = None
    failed = _sequence_items(answer, TAG_FAILED_SOP_SEQUENCE)
    failed_uids = [str(_first_value(item, TAG_REFERENCED_SOP_INSTANCE_UID)) for item in failed]
    if response.status_code >= 300:
        raise StowError(
            f"STOW-RS to {url} answered HTTP {response.status_code}: {response.text[:500]}",
            response.status_code,
            failed_uids,
        )
    if failed:
        reasons = sorted({str(_first_value(item, TAG_FAILURE_REASON)) for item in failed})
        raise StowError(
            f"STOW-RS to {url} answered HTTP {response.status_code} but {len(failed)} of "
            f"{len(datasets)} instances failed (failure reasons {', '.join(reasons)})",
            response.status_code,
            failed_uids,
        )
    stored = _sequence_items(answer, TAG_REFERENCED_SOP_SEQUENCE)
    if answer is not None and len(stored) < len(datasets):
        raise StowError(
            f"STOW-RS to {url} answered HTTP {response.status_code} but acknowledged only "
            f"{len(stored)} of {len(datasets)} instances",
            response.status_code,
        )


def _demo_uid(key: str) -> str:
    return _derived_uid(DEMO_ENTROPY, key)


def demo_studies() -> list[StudySpec]:
    """Six realistic studies of four patients, with fixed UIDs.

    Patients: Doe^Jane (PAT001 @ HOSP-A), Müller^Jürgen (PAT002 @ HOSP-A, ISO_IR 100),
    Yamada^Tarou=山田^太郎 (12345 @ HOSP-B, ISO_IR 192) and Smith^John (PAT001 @ HOSP-B:
    same Patient ID as Doe^Jane under another issuer).
    """
    return [
        StudySpec(
            uid=_demo_uid("ct-chest-abdomen"),
            patient_id="PAT001",
            patient_name="Doe^Jane",
            issuer="HOSP-A",
            birth_date="19700101",
            sex="F",
            accession="A1001",
            accession_issuer="HOSP-A-RIS",
            study_date="20240102",
            study_time="101500",
            tz_offset="+0100",
            description="CT Chest Abdomen with contrast",
            study_id="CT1001",
            series=[
                SeriesSpec("CT", "Topogram 0.6 T20f", "CHEST", instances=1),
                SeriesSpec("CT", "Thorax 1.0 B70f", "CHEST", instances=3),
                SeriesSpec("CT", "Abdomen 3.0 B30f venous", "ABDOMEN", instances=3),
            ],
        ),
        StudySpec(
            uid=_demo_uid("mg-bilateral"),
            patient_id="PAT001",
            patient_name="Doe^Jane",
            issuer="HOSP-A",
            birth_date="19700101",
            sex="F",
            accession="A1002",
            accession_issuer="HOSP-A-RIS",
            study_date="20240315",
            study_time="083000",
            tz_offset="+0100",
            description="Screening mammography bilateral",
            study_id="MG1002",
            series=[
                SeriesSpec("MG", "L CC/MLO", "BREAST", "L", instances=2),
                SeriesSpec("MG", "R CC/MLO", "BREAST", "R", instances=2),
            ],
        ),
        StudySpec(
            uid=_demo_uid("cr-chest"),
            patient_id="PAT002",
            patient_name="Müller^Jürgen",
            issuer="HOSP-A",
            birth_date="19581123",
            sex="M",
            accession="A1003",
            accession_issuer="HOSP-A-RIS",
            study_date="20231120",
            study_time="142210",
            tz_offset="+0100",
            description="Thorax p.a. und seitlich",
            study_id="CR1003",
            referring_physician="Schäfer^Gisela^^Dr.",
            series=[SeriesSpec("CR", "Thorax PA/LL", "CHEST", instances=2)],
        ),
        StudySpec(
            uid=_demo_uid("us-abdomen"),
            patient_id="PAT002",
            patient_name="Müller^Jürgen",
            issuer="HOSP-A",
            birth_date="19581123",
            sex="M",
            accession="A1004",
            accession_issuer="HOSP-A-RIS",
            study_date="20240220",
            study_time="091500",
            description="Sonographie Abdomen",
            study_id="US1004",
            series=[SeriesSpec("US", "Oberbauch", "ABDOMEN", instances=3)],
        ),
        StudySpec(
            uid=_demo_uid("mr-brain"),
            patient_id="12345",
            patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
            issuer="HOSP-B",
            birth_date="19800505",
            sex="M",
            accession="B2001",
            accession_issuer="HOSP-B-RIS",
            study_date="20240410",
            study_time="160000",
            tz_offset="+0900",
            description="MR Brain without contrast",
            study_id="MR2001",
            referring_physician="Sato^Hanako",
            series=[
                SeriesSpec("MR", "T1 SE axial", "HEAD", instances=3),
                SeriesSpec("MR", "T2 TSE axial", "HEAD", instances=3),
            ],
        ),
        StudySpec(
            uid=_demo_uid("ct-head"),
            patient_id="PAT001",
            patient_name="Smith^John",
            issuer="HOSP-B",
            birth_date="19651231",
            sex="M",
            accession="B2002",
            accession_issuer="HOSP-B-RIS",
            study_date="20240501",
            study_time="031245",
            description="CT Head non-contrast",
            study_id="CT2002",
            series=[SeriesSpec("CT", "Head 5.0 H40s", "HEAD", instances=2)],
        ),
    ]


def load_demo(dicomweb_url: str) -> list[StudySpec]:
    """Store every demo study (one STOW-RS request per study) and return their specs."""
    specs = demo_studies()
    with httpx.Client(timeout=60.0) as client:
        for spec in specs:
            stow(dicomweb_url, build_study(spec), client=client)
    return specs


KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_rejection_note(
    spec: StudySpec,
    rejected: Sequence[Dataset],
    *,
    reason: tuple[str, str] = ("113001", "Rejected for Quality Reasons"),
    series_number: int = 999,
) -> Dataset:
    """An IHE IOCM rejection note: a Key Object Selection Document (PS3.3 A.35.4) titled with a
    rejection reason (CID 7011) that lists ``rejected`` in its Current Requested Procedure Evidence
    Sequence and its content tree, in a KO series of its own, for the study of ``spec``.
    """
    assert spec.uid is not None, "build the study first"
    note_uid = _derived_uid(spec.uid, "rejection-note", *[ds.SOPInstanceUID for ds in rejected])
    ds = Dataset()
    ds.file_meta = _file_meta(KEY_OBJECT_SELECTION, note_uid)
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = note_uid
    ds.PatientName = spec.patient_name
    if spec.patient_id is not None:
        ds.PatientID = spec.patient_id
    if spec.issuer is not None:
        ds.IssuerOfPatientID = spec.issuer
    ds.PatientBirthDate = spec.birth_date or ""
    ds.PatientSex = spec.sex or ""
    ds.StudyInstanceUID = spec.uid
    ds.StudyDate = spec.study_date or ""
    ds.StudyTime = spec.study_time or ""
    ds.ReferringPhysicianName = spec.referring_physician
    ds.StudyID = spec.study_id or ""
    ds.AccessionNumber = spec.accession or ""
    ds.StudyDescription = spec.description
    ds.Modality = "KO"
    ds.SeriesInstanceUID = _derived_uid(spec.uid, "rejection-series", note_uid)
    ds.SeriesNumber = series_number
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = "FHIR-DICOMweb bridge tests"
    ds.InstanceNumber = 1
    ds.ContentDate = spec.study_date or ""
    ds.ContentTime = spec.study_time or ""
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(reason[0], "DCM", reason[1])]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = [template]
    by_series: dict[str, list[Dataset]] = {}
    for image in rejected:
        by_series.setdefault(str(image.SeriesInstanceUID), []).append(image)
    series_items = []
    for series_uid, images in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        references = []
        for image in images:
            reference = Dataset()
            reference.ReferencedSOPClassUID = image.SOPClassUID
            reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
            references.append(reference)
        item.ReferencedSOPSequence = references
        series_items.append(item)
    evidence = Dataset()
    evidence.StudyInstanceUID = spec.uid
    evidence.ReferencedSeriesSequence = series_items
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    content = []
    for image in rejected:
        reference = Dataset()
        reference.ReferencedSOPClassUID = image.SOPClassUID
        reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "IMAGE"
        item.ReferencedSOPSequence = [reference]
        content.append(item)
    ds.ContentSequence = content
    return ds


XRAY_RADIATION_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


def _num(concept: tuple[str, str], value: str, unit: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "NUM"
    item.ConceptNameCodeSequence = [_code(concept[0], "DCM", concept[1])]
    measured = Dataset()
    measured.NumericValue = value
    measured.MeasurementUnitsCodeSequence = [_code(unit[0], "UCUM", unit[1])]
    item.MeasuredValueSequence = [measured]
    return item


def _container(concept: tuple[str, str], children: list[Dataset]) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "CONTAINER"
    item.ConceptNameCodeSequence = [_code(concept[0], "DCM", concept[1])]
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = children
    return item


def build_dose_report(
    spec: StudySpec,
    kind: str,
    values: dict[str, str],
    *,
    series_number: int = 900,
) -> Dataset:
    """An X-Ray Radiation Dose SR (PS3.3 A.35.8) for the study of ``spec``, in an SR series of its own.

    ``kind`` ``ct`` follows TID 10011 (CT Radiation Dose: accumulated DLP, TID 10012; one CT
    acquisition with its Mean CTDIvol and DLP, TID 10013) with ``values`` ``dlp_total``,
    ``ctdivol`` and ``dlp``; ``xray`` follows TID 10001 (Projection X-Ray Radiation Dose, with the
    accumulated dose-area product and dose at the reference point of TID 10004) with ``dap_total``
    (Gy.m2) and ``rp_total`` (Gy). Values are decimal strings, as DS holds them.
    """
    assert spec.uid is not None, "build the study first"
    report_uid = _derived_uid(spec.uid, "dose-report", kind)
    ds = Dataset()
    ds.file_meta = _file_meta(XRAY_RADIATION_DOSE_SR, report_uid)
    ds.SOPClassUID = XRAY_RADIATION_DOSE_SR
    ds.SOPInstanceUID = report_uid
    ds.PatientName = spec.patient_name
    if spec.patient_id is not None:
        ds.PatientID = spec.patient_id
    if spec.issuer is not None:
        ds.IssuerOfPatientID = spec.issuer
    ds.PatientBirthDate = spec.birth_date or ""
    ds.PatientSex = spec.sex or ""
    ds.StudyInstanceUID = spec.uid
    ds.StudyDate = spec.study_date or ""
    ds.StudyTime = spec.study_time or ""
    ds.ReferringPhysicianName = spec.referring_physician
    ds.StudyID = spec.study_id or ""
    ds.AccessionNumber = spec.accession or ""
    ds.StudyDescription = spec.description
    ds.Modality = "SR"
    ds.SeriesInstanceUID = _derived_uid(spec.uid, "dose-series", kind)
    ds.SeriesNumber = series_number
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = "FHIR-DICOMweb bridge tests"
    ds.InstanceNumber = 1
    ds.ContentDate = spec.study_date or ""
    ds.ContentTime = spec.study_time or ""
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("113701", "DCM", "X-Ray Radiation Dose Report")]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    procedure = Dataset()
    procedure.RelationshipType = "HAS CONCEPT MOD"
    procedure.ValueType = "CODE"
    procedure.ConceptNameCodeSequence = [_code("121058", "DCM", "Procedure reported")]
    mgy, mgycm = ("mGy", "mGy"), ("mGy.cm", "mGy.cm")
    if kind == "ct":
        template.TemplateIdentifier = "10011"
        procedure.ConceptCodeSequence = [_code("77477000", "SCT", "Computed Tomography X-Ray")]
        content = [
            procedure,
            _container(
                ("113811", "CT Accumulated Dose Data"),
                [
                    _num(("113812", "Total Number of Irradiation Events"), "1", ("{events}", "events")),
                    _num(("113813", "CT Dose Length Product Total"), values["dlp_total"], mgycm),
                ],
            ),
            _container(
                ("113819", "CT Acquisition"),
                [
                    _container(
                        ("113829", "CT Dose"),
                        [
                            _num(("113830", "Mean CTDIvol"), values["ctdivol"], mgy),
                            _num(("113838", "DLP"), values["dlp"], mgycm),
                        ],
                    )
                ],
            ),
        ]
    elif kind == "xray":
        template.TemplateIdentifier = "10001"
        procedure.ConceptCodeSequence = [_code("113704", "DCM", "Projection X-Ray")]
        content = [
            procedure,
            _container(
                ("113702", "Accumulated X-Ray Dose Data"),
                [
                    _num(("113722", "Dose Area Product Total"), values["dap_total"], ("Gy.m2", "Gy.m2")),
                    _num(("113725", "Dose (RP) Total"), values["rp_total"], ("Gy", "Gy")),
                ],
            ),
        ]
    else:
        raise ValueError(f"kind must be ct or xray, not {kind!r}")
    ds.ContentTemplateSequence = [template]
    ds.ContentSequence = content
    return ds
