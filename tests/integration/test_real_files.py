"""Real DICOM files written by others: pydicom's bundled test and character-set files.

Every readable file is stored in the test Orthanc over STOW-RS, as it is on disk; then one sync.
Each study must be published exactly once, or parked naming the attribute at fault; each study
with a PatientID and a valid Study Instance UID must be published; and every published Patient's
name must be what pydicom decodes from the files themselves, in every character set.
"""

from __future__ import annotations

import collections
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import UID

from bridge.mapping.identifiers import study_search
from bridge.mapping.patient import human_names
from bridge.mapping.records import raw_uid
from bridge.mapping.values import clean_text
from bridge.state.store import SqlStore
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class RealFile:
    path: Path
    study_uid: str
    patient_id: str | None
    patient_name: str | None  # as pydicom decodes it from the file's own bytes


def real_files() -> list[RealFile]:
    """Every file pydicom ships (offline) that it can read as a DICOM instance of a study."""
    paths = sorted({*get_testdata_files(), *get_charset_files()})
    found = []
    saved = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        for name in paths:
            path = Path(name)
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
                study_uid, sop_uid = ds.get("StudyInstanceUID"), ds.get("SOPInstanceUID")
            except Exception:  # noqa: BLE001 - not a DICOM file pydicom can read: not in the corpus
                continue
            if not study_uid or not sop_uid:
                continue
            found.append(RealFile(path, str(study_uid), _patient_id(ds), _name(ds)))
    finally:
        pydicom_config.settings.reading_validation_mode = saved
    return found


def _patient_id(ds: Dataset) -> str | None:
    value = ds.get("PatientID")
    return clean_text(str(value)) if value is not None else None


def _name(ds: Dataset) -> str | None:
    value = ds.get("PatientName")
    return clean_text(str(value)) if value is not None else None


def stow_file(http: httpx.Client, url: str, data: bytes) -> str | None:
    """Store one file as it is on disk; None when stored, else why Orthanc refused it."""
    boundary = f"real-{uuid.uuid4().hex}"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    response = http.post(f"{url}/studies", content=body, headers=headers)
    if response.status_code >= 300:
        return f"HTTP {response.status_code}"
    answer = response.json() if response.content else {}
    failed = (answer.get("00081198") or {}).get("Value") or []
    if failed:
        reasons = sorted({str((i.get("00081197") or {}).get("Value", ["?"])[0]) for i in failed})
        return f"HTTP {response.status_code}, failure reason {', '.join(reasons)}"
    return None


def archive_study_uids(stack: Stack) -> list[str]:
    response = httpx.get(
        f"{stack.orthanc.dicomweb_url}/studies",
        params={"includefield": "0020000D", "limit": "10000"},
        timeout=60,
    )
    response.raise_for_status()
    return [
        str(row["0020000D"]["Value"][0]) for row in response.json() if row.get("0020000D", {}).get("Value")
    ]


def archive_name(stack: Stack, study_uid: str) -> list[dict[str, Any]] | None:
    """The HumanNames of the PatientName the archive's own WADO-RS metadata gives."""
    response = httpx.get(f"{stack.orthanc.dicomweb_url}/studies/{study_uid}/metadata", timeout=60)
    response.raise_for_status()
    element = response.json()[0].get("00100010")
    if not element:
        return None
    name = clean_text(str(Dataset.from_json({"00100010": element}).PatientName))
    return human_names(name) if name else None


# Orthanc 1.10.1 (Debian's) loses the ISO 2022 escape sequences of JIS X 0208 (ISO 2022 IR 87)
# when it transcodes to UTF-8, in QIDO-RS and in WADO-RS metadata alike (chrH32.dcm,
# chrJapMulti.dcm, chrJapMultiExplicitIR6.dcm). The bridge tells such a name from a name and reads
# it from the instance's Part 10 header instead: no published name may be the archive's garble.
ARCHIVE_GARBLES: set[str] = set()


def test_real_files_publish_or_park_naming_the_attribute_and_keep_every_name(stack: Stack) -> None:
    files = real_files()
    assert len(files) > 100  # pydicom's own corpus, bundled with the package

    rejected: dict[str, str] = {}
    with httpx.Client(timeout=120) as http:
        for real in files:
            why = stow_file(http, stack.orthanc.dicomweb_url, real.path.read_bytes())
            if why is not None:
                rejected[real.path.name] = why
    stored = [f for f in files if f.path.name not in rejected]

    report = stack.sync()
    again = stack.sync()
    assert again.counts.created == 0 and again.counts.updated == 0  # nothing twice

    store = SqlStore(stack.settings().state_url)
    try:
        parked = {p.study_uid: p for p in store.parked("test-orthanc")}
    finally:
        store.close()

    by_study: dict[str, list[RealFile]] = collections.defaultdict(list)
    for real in stored:
        by_study[real.study_uid].append(real)
    names_by_patient: dict[str, list[Any]] = collections.defaultdict(list)
    for real in stored:
        if real.patient_id:
            names_by_patient[real.patient_id].append(
                human_names(real.patient_name) if real.patient_name else None
            )

    published: list[str] = []
    garbled_by_archive: list[str] = []
    parked_by: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    for study_uid in archive_study_uids(stack):
        valid_uid = UID(study_uid, validation_mode=pydicom_config.IGNORE).is_valid
        key = raw_uid({"0020000D": {"vr": "UI", "Value": [study_uid]}}) or study_uid
        found = stack.fhir_search("ImagingStudy", identifier=study_search(study_uid)) if valid_uid else []
        if found:
            if len(found) != 1:
                problems.append(f"{key}: published {len(found)} times")
            published.append(study_uid)
            patient = stack.fhir_read(found[0]["subject"]["reference"])
            [identifier] = [i for i in patient["identifier"] if i["value"] in names_by_patient]
            if patient.get("name") not in names_by_patient[identifier["value"]]:
                if patient.get("name") == archive_name(stack, study_uid):
                    garbled_by_archive.append(study_uid)  # the archive itself decodes it so
                else:
                    problems.append(f"{key}: the Patient's name is not pydicom's decoding of any file")
            continue
        if key not in parked or not parked[key].attribute:
            problems.append(f"{key}: neither published nor parked with an attribute")
            continue
        attribute = str(parked[key].attribute)
        parked_by[attribute] += 1
        has_patient_id = any(f.patient_id for f in by_study.get(study_uid, []))
        if valid_uid and has_patient_id:
            problems.append(f"{key}: has a PatientID and a valid UID but was parked ({attribute})")

    summary = {
        "files": len(files),
        "stow_rejected": rejected,
        "studies": len(published) + sum(parked_by.values()),
        "published": len(published),
        "parked_by_attribute": dict(parked_by),
        "fallbacks": report.counts.fallbacks,
        "names_garbled_by_the_archive": sorted(
            {f.path.name for uid in garbled_by_archive for f in by_study.get(uid, [])}
        ),
    }
    print("real-file corpus:", json.dumps(summary, indent=1, sort_keys=True))
    assert not problems, problems
    assert set(summary["names_garbled_by_the_archive"]) <= ARCHIVE_GARBLES, summary
    assert len(published) >= 30, summary
