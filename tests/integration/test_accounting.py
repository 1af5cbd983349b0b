"""Every study accounted for, true counts on every engine, names from the best source.

Each study the archive lists ends a run published, parked with a reason, or counted under a
named reason; ``created`` means the study had no ImagingStudy before, on Medplum (whose batch
answers 200 to a PUT that creates) as on HAPI.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_charset_files

from bridge.mapping.records import raw_uid
from bridge.sync import metrics
from tests.integration.conftest import Stack
from tests.integration.test_resolver import running
from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer
from tests.stack.samples import StudySpec, build_study, stow

pytestmark = pytest.mark.integration


def store(stack: Stack, *specs: StudySpec) -> list[str]:
    uids = []
    for spec in specs:
        datasets = build_study(spec)
        stow(stack.orthanc.dicomweb_url, datasets)
        uids.append(str(datasets[0].StudyInstanceUID))
    return uids


# Values Orthanc stores and lists as Study Instance UIDs though they are not UIDs: letters, a
# leading zero, a trailing dot, over 64 characters, a word (an anonymiser's).
NOT_UIDS = ["1.2.3.ABC.4", "1.2.03.4", "1.2.3.", "1." + "2" * 70, "Anonymized"]


@pytest.mark.interop
def test_a_study_whose_uid_is_not_a_uid_is_parked_in_the_run_status_metrics_and_retry(stack: Stack) -> None:
    saved = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        bad = store(stack, *(StudySpec(uid=u, patient_id="INV-SECRET") for u in NOT_UIDS))
    finally:
        pydicom_config.settings.writing_validation_mode = saved
    store(stack, StudySpec(patient_id="OK-1"))
    keys = {raw_uid({"0020000D": {"vr": "UI", "Value": [u]}}) for u in bad}
    assert len(keys) == len(NOT_UIDS) and not keys & set(NOT_UIDS)  # stand-ins, never the value

    report = stack.sync()
    assert (report.counts.seen, report.counts.created, report.counts.parked) == (6, 1, 5)
    assert {p.study_uid for p in report.parked} == keys
    assert {p.attribute for p in report.parked} == {"StudyInstanceUID"}
    assert metrics.PARKED._value.get() == 5

    status = stack.cli("status", "--json")
    data = json.loads(status.stdout)
    assert data["parked"] == 5 and data["runs"][0]["parked"] == 5
    assert {p["study_uid"] for p in data["parked_studies"]} == keys
    assert {p["attribute"] for p in data["parked_studies"]} == {"StudyInstanceUID"}
    assert "Anonymized" not in status.stdout and "ABC" not in status.stdout

    retry = stack.cli("retry")
    assert retry.returncode == 1, retry.stderr  # still parked, said so, no traceback
    assert "5 parked studies have no valid Study Instance UID" in retry.stderr
    assert "Traceback" not in retry.stderr
    again = stack.sync()
    assert (again.counts.parked, again.counts.unchanged) == (5, 1)  # checked again, still accounted for


@pytest.fixture(scope="module")
def medplum_answering_200(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirTestServer]:
    """The Medplum test server answering 200 to a PUT that creates, as Medplum's own router does."""
    log = tmp_path_factory.mktemp("medplum200") / "fhir-200.log"
    with FhirTestServer(log_path=log, env={"FHIR_CREATE_STATUS": "200"}) as server:
        yield server


def check_counts_on_two_runs(stack: Stack) -> None:
    """A first run creates every study, a second writes none, a changed study is updated."""
    specs = [StudySpec(patient_id=f"CNT-{n}", accession=f"ACC{n}") for n in range(3)]
    uids = store(stack, *specs)
    first = stack.sync()
    assert (first.counts.created, first.counts.updated, first.counts.parked) == (3, 0, 0)
    assert len(stack.fhir_search("ImagingStudy")) == 3
    second = stack.sync()
    assert (second.counts.created, second.counts.updated, second.counts.unchanged) == (0, 0, 3)
    changed = build_study(StudySpec(patient_id="CNT-0", accession="ACC0", uid=uids[0], description="Late"))
    stow(stack.orthanc.dicomweb_url, changed)
    third = stack.sync()
    assert (third.counts.created, third.counts.updated, third.counts.unchanged) == (0, 1, 2)
    status = stack.cli("status", "--json")
    assert [r["created"] for r in json.loads(status.stdout)["runs"]][:3] == [0, 0, 3]


@pytest.mark.interop
def test_created_and_updated_are_true_on_a_first_and_second_run(stack: Stack) -> None:
    check_counts_on_two_runs(stack)


def test_created_is_true_where_the_server_answers_200_to_a_put_that_creates(
    stack: Stack, medplum_answering_200: FhirTestServer
) -> None:
    medplum_answering_200.clear()
    env = {**stack.env, "BRIDGE_FHIR_URL": medplum_answering_200.base_url}
    check_counts_on_two_runs(Stack(stack.orthanc, medplum_answering_200, stack.state_path, env))


@pytest.mark.interop
def test_a_two_valued_accession_number_is_published_and_resolves_by_either_value(stack: Stack) -> None:
    order = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"display": "unlinked"},
        "identifier": [{"value": "ACC-TWO-B"}],
    }
    created = httpx.post(f"{stack.fhir.base_url}/ServiceRequest", json=order, timeout=30)
    created.raise_for_status()
    [uid] = store(stack, StudySpec(patient_id="ACC-2", accession="ACC-TWO-A\\ACC-TWO-B"))
    report = stack.sync(order_policy="match")
    assert (report.counts.created, report.counts.parked) == (1, 0)
    [study] = stack.fhir_search("ImagingStudy")
    accessions = [i["value"] for i in study["identifier"] if i.get("type")]
    assert accessions == ["ACC-TWO-A", "ACC-TWO-B"]
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{created.json()['id']}"}]

    async def resolve(value: str) -> httpx.Response:
        async with running(stack.settings()) as api:
            return await api.get(f"/accessions/{value}/links")

    for value in ("ACC-TWO-A", "ACC-TWO-B"):  # the resolver finds the study by either number
        answer = asyncio.run(resolve(value))
        assert answer.status_code == 200, answer.text
        assert answer.json()["study"]["url"].endswith(f"/studies/{uid}")


@pytest.fixture(scope="module")
def latin1_orthanc() -> Iterator[OrthancServer]:
    """An Orthanc left at its default encoding, Latin-1, as real archives often are."""
    with OrthancServer(name="bridge-test-latin1", default_encoding="Latin1") as server:
        yield server


def patient_names(stack: Stack) -> dict[str, Any]:
    """Each Patient's name, by its PatientID."""
    return {p["identifier"][0]["value"]: p.get("name") for p in stack.fhir_search("Patient")}


def stow_charset_file(stack: Stack, name: str, patient_id: str) -> str:
    """Store one of pydicom's character-set files under a PatientID of its own; its Study UID."""
    [path] = get_charset_files(name)
    ds = pydicom.dcmread(path)
    ds.PatientID = patient_id
    stow(stack.orthanc.dicomweb_url, [ds])
    return str(ds.StudyInstanceUID)


@pytest.mark.interop
def test_an_iso_2022_japanese_name_the_archive_garbles_is_restored_from_the_part10_header(
    stack: Stack,
) -> None:
    stow_charset_file(stack, "chrJapMulti.dcm", "JIS-1")  # its JIS bytes hold 0x5E ('^')
    garbled = httpx.get(f"{stack.orthanc.dicomweb_url}/studies", params={"PatientID": "JIS-1"}, timeout=30)
    assert "やまだ" not in garbled.text  # Orthanc 1.10 splits the name into fragments
    report = stack.sync()
    assert (report.counts.created, report.counts.parked, report.counts.fallbacks) == (1, 0, 0)
    [name] = patient_names(stack)["JIS-1"]
    assert name["family"] == "やまだ" and name["given"] == ["たろう"]


@pytest.mark.interop
def test_a_latin1_orthanc_gives_names_from_the_part10_header_or_none_but_never_garbage(
    stack: Stack, latin1_orthanc: OrthancServer
) -> None:
    latin1_orthanc.clear()
    archive = Stack(
        latin1_orthanc,
        stack.fhir,
        stack.state_path,
        {**stack.env, "BRIDGE_DICOMWEB_URL": latin1_orthanc.dicomweb_url},
    )
    store(
        archive,
        StudySpec(patient_id="L1-JA", patient_name="山田^太郎"),
        StudySpec(patient_id="L1-DE", patient_name="Müller^Jürgen"),
    )
    answer = httpx.get(f"{latin1_orthanc.dicomweb_url}/studies", params={"PatientID": "L1-JA"}, timeout=30)
    assert "山田" not in answer.text  # what the archive's JSON gives is not the name
    report = archive.sync()
    assert (report.counts.created, report.counts.parked, report.counts.fallbacks) == (2, 0, 0)
    names = patient_names(archive)
    assert names["L1-JA"][0]["family"] == "山田" and names["L1-JA"][0]["given"] == ["太郎"]
    assert names["L1-DE"][0]["family"] == "Müller"
