"""Pure link building: endpoint choice, base confinement, URLs, viewer templates."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge.errors import NoUsableEndpointError, StudyNotFoundError, StudyWithdrawnError
from bridge.mapping.context import WITHDRAWN_EXTENSION, WITHDRAWN_INSTANCE_EXTENSION
from bridge.resolve.links import (
    ViewerTemplate,
    build_links,
    locate,
    normalize_base,
    render_viewer,
    template_fields,
    under_base,
)
from tests.unit.resolve.fake_fhir import DICOMWEB_BASE, SERIES_UIDS, STUDY_UID, endpoint, imaging_study

BASES = (DICOMWEB_BASE,)


def test_located_study_uses_the_study_endpoint_for_every_series() -> None:
    location = locate(imaging_study(), {"Endpoint/ep1": endpoint()}, BASES)
    assert location.study_uid == STUDY_UID
    assert location.base == DICOMWEB_BASE
    assert [s.base for s in location.series] == [DICOMWEB_BASE, DICOMWEB_BASE]
    assert location.accession == "A1001"


def test_series_level_endpoint_overrides_the_studys() -> None:
    other = f"{DICOMWEB_BASE}/tenant-b"
    series = [
        {"uid": SERIES_UIDS[0], "endpoint": [{"reference": "Endpoint/ep2"}]},
        {"uid": SERIES_UIDS[1]},
    ]
    location = locate(
        imaging_study(series=series),
        {"Endpoint/ep1": endpoint(), "Endpoint/ep2": endpoint("ep2", other)},
        BASES,
    )
    assert [s.base for s in location.series] == [other, DICOMWEB_BASE]
    links = build_links(location, fhir_base="https://f", viewers={}, default_viewer="ohif", bases=BASES)
    assert links["series"][0]["metadata"] == f"{other}/studies/{STUDY_UID}/series/{SERIES_UIDS[0]}/metadata"


def test_series_whose_own_endpoint_is_unusable_gets_no_links_rather_than_the_studys() -> None:
    series = [{"uid": SERIES_UIDS[0], "endpoint": [{"reference": "Endpoint/evil"}]}]
    location = locate(
        imaging_study(series=series),
        {"Endpoint/ep1": endpoint(), "Endpoint/evil": endpoint("evil", "https://evil.example.com/wado")},
        BASES,
    )
    links = build_links(location, fhir_base="https://f", viewers={}, default_viewer="ohif", bases=BASES)
    assert "url" not in links["series"][0]
    assert "evil.example.com" not in str(links)
    assert "not under a configured DICOMweb base" in links["series"][0]["unavailable"]


@pytest.mark.parametrize(
    ("ep", "reason"),
    [
        (endpoint(address="https://evil.example.com/dicom-web"), "not under a configured"),
        (endpoint(address="https://pacs.example.org/dicom-webX"), "not under a configured"),
        (endpoint(address="https://pacs.example.org/dicom-web/../admin"), "not under a configured"),
        (endpoint(address="https://user@pacs.example.org/dicom-web"), "not under a configured"),
        (endpoint(address="https://pacs.example.org/dicom-web?x=1"), "not under a configured"),
        (endpoint(connectionType={"code": "dicom-qido-rs"}), "dicom-wado-rs"),
        (endpoint(status="off"), "not 'active'"),
        (None, "not found"),
    ],
)
def test_unusable_endpoints_give_409_with_the_reason_and_never_the_address(
    ep: dict | None, reason: str
) -> None:
    with pytest.raises(NoUsableEndpointError) as caught:
        locate(imaging_study(), {"Endpoint/ep1": ep} if ep else {}, BASES)
    assert reason in str(caught.value)
    assert "evil.example.com" not in str(caught.value)


def test_study_without_endpoint_and_withdrawn_studies() -> None:
    with pytest.raises(NoUsableEndpointError, match="references no Endpoint"):
        locate(imaging_study(endpoints=[]), {}, BASES)
    with pytest.raises(StudyNotFoundError, match="entered-in-error"):
        locate(imaging_study(status="entered-in-error"), {"Endpoint/ep1": endpoint()}, BASES)


def test_study_without_uid_identifier_is_a_conflict() -> None:
    resource = imaging_study()
    resource["identifier"] = resource["identifier"][1:]
    with pytest.raises(NoUsableEndpointError, match="Study Instance UID"):
        locate(resource, {"Endpoint/ep1": endpoint()}, BASES)


def test_base_normalisation() -> None:
    assert (
        normalize_base("HTTP://PACS.example.org:8042/dicom-web/") == "http://pacs.example.org:8042/dicom-web"
    )
    assert normalize_base("ftp://pacs/x") is None
    assert normalize_base("https://pacs/a/%2e%2e/b") is None
    assert (
        under_base("https://pacs.example.org/dicom-web/sub", BASES)
        == "https://pacs.example.org/dicom-web/sub"
    )
    assert under_base("https://pacs.example.org.evil.com/dicom-web", BASES) is None


def test_links_carry_every_wado_rs_url() -> None:
    location = locate(imaging_study(), {"Endpoint/ep1": endpoint()}, BASES)
    links = build_links(location, fhir_base="https://fhir/R4", viewers={}, default_viewer="ohif", bases=BASES)
    study = f"{DICOMWEB_BASE}/studies/{STUDY_UID}"
    assert links["study"] == {
        "url": study,
        "metadata": f"{study}/metadata",
        "rendered": f"{study}/rendered",
        "thumbnail": f"{study}/thumbnail",
    }
    assert links["imaging_study_url"] == "https://fhir/R4/ImagingStudy/is1"
    assert [s["uid"] for s in links["series"]] == list(SERIES_UIDS)


def test_a_location_whose_base_or_series_base_left_the_bases_builds_no_links() -> None:
    # build_links takes any StudyLocation, not only one locate() made: it checks every base again.
    location = locate(imaging_study(), {"Endpoint/ep1": endpoint()}, BASES)
    outside = "https://evil.example.com/wado"
    for bad in (
        replace(location, base=outside),
        replace(location, series=(location.series[0], replace(location.series[1], base=outside))),
    ):
        with pytest.raises(NoUsableEndpointError, match="left the configured bases"):
            build_links(bad, fhir_base="https://f", viewers={}, default_viewer="ohif", bases=BASES)


def test_a_series_uid_that_is_not_a_uid_is_checked_whole() -> None:
    location = locate(imaging_study(), {"Endpoint/ep1": endpoint()}, BASES)
    odd = replace(location, series=(replace(location.series[0], uid="SERIES-A"),))
    links = build_links(odd, fhir_base="https://f", viewers={}, default_viewer="ohif", bases=BASES)
    assert links["series"][0]["url"] == f"{DICOMWEB_BASE}/studies/{STUDY_UID}/series/SERIES-A"
    # an encoded slash could step out of the base once a server decodes it: refused, as before
    sneaky = replace(location, series=(replace(location.series[0], uid="../../admin"),))
    with pytest.raises(NoUsableEndpointError, match="left the configured bases"):
        build_links(sneaky, fhir_base="https://f", viewers={}, default_viewer="ohif", bases=BASES)


def test_viewer_values_are_percent_encoded_and_unknown_placeholders_refused() -> None:
    viewer = ViewerTemplate("g", "{base_url}/open?acc={accession}&wado={dicomweb_base}", "https://v.example/")
    url = render_viewer(viewer, {"accession": "A&B 1", "dicomweb_base": "https://p/x"})
    assert url == "https://v.example/open?acc=A%26B%201&wado=https%3A%2F%2Fp%2Fx"
    assert render_viewer(viewer, {"accession": None, "dicomweb_base": "x"}) is None
    for bad in ("{patient_name}", "{study_uid.__class__}", "{study_uid!r}", "{study_uid:>10}", "{"):
        with pytest.raises(ValueError):
            template_fields(bad)


@pytest.mark.parametrize(
    "address",
    [
        "http://pacs.example.org/dicom-web/..;/..;/admin",
        "http://pacs.example.org/dicom-web;x=1",
        "http://pacs.example.org/dicom-web/%5c..%5cadmin",
        "http://pacs.example.org/dicom-web/%252e%252e/admin",
        "http://pacs.example.org/dicom-web/%00",
        "http://pacs.example.org/dicom-web/%2E%2E/admin",
        "http://pacs.example.org/dicom-web/%2fadmin",
        "http://pacs.example.org/dicom-web/caf\u00e9",
        "http://pacs.example.org/dicom-web/a b",
        "http://pacs.example.org/dicom-web/a:b",
        "http://pacs.example.org/dicom-web/@x",
    ],
)
def test_addresses_outside_the_path_whitelist_are_refused(address: str) -> None:
    assert normalize_base(address) is None
    assert under_base(address, BASES) is None


def test_escapes_of_unreserved_characters_are_decoded_and_kept() -> None:
    assert (
        normalize_base("http://pacs.example.org/dicom%2Dweb/%7Eall")
        == "http://pacs.example.org/dicom-web/~all"
    )


def test_a_study_the_bridge_withdrew_is_refused_with_the_reason_whatever_else_it_holds() -> None:
    resource = imaging_study()
    resource["extension"] = [{"url": WITHDRAWN_EXTENSION, "valueCode": "conflicting-patient-identity"}]
    with pytest.raises(StudyWithdrawnError, match="conflicting patient identity"):
        locate(resource, {"Endpoint/ep1": endpoint()}, BASES)
    resource["extension"][0]["valueCode"] = "a-code-of-a-newer-bridge"
    with pytest.raises(StudyWithdrawnError):  # an unknown withdrawal still withdraws
        locate(resource, {"Endpoint/ep1": endpoint()}, BASES)
    resource["extension"] = [{"url": "http://example.org/other", "valueCode": "x"}]
    assert locate(resource, {"Endpoint/ep1": endpoint()}, BASES).study_uid == STUDY_UID


def test_a_located_study_carries_the_instances_rejection_notes_withdrew() -> None:
    named = [
        {"url": WITHDRAWN_INSTANCE_EXTENSION, "valueId": "1.2.3.4"},
        {"url": "urn:other", "valueId": "5.6"},
    ]
    resource = {**imaging_study(), "extension": named}
    assert locate(resource, {"Endpoint/ep1": endpoint()}, BASES).withdrawn == {"1.2.3.4"}
    assert locate(imaging_study(), {"Endpoint/ep1": endpoint()}, BASES).withdrawn == frozenset()
