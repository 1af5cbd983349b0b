"""The viewer table in mappings/ and the settings that choose and override viewers."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import ConfigurationError
from bridge.resolve.links import ViewerTemplate, render_viewer
from bridge.resolve.viewers import configure_viewers, load_viewer_table

UID = "1.2.840.113619.2.55.3"


OHIF_ONLY = {"default": "stone", "enabled": ["ohif"], "base_urls": {"ohif": "https://o.example"}}


def _configure(**kwargs: object) -> dict[str, ViewerTemplate]:
    args: dict[str, object] = {"enabled": None, "default": "ohif", "base_urls": {}, "templates": {}}
    args.update(kwargs)
    return configure_viewers(load_viewer_table(), **args)  # type: ignore[arg-type]


def test_bundled_table_loads_with_the_four_viewers_and_their_provenance() -> None:
    table = load_viewer_table()
    assert list(table.viewers) == ["ohif", "stone", "iid", "generic"]
    assert all(v.source for v in table.viewers.values())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ohif", f"https://v.example/viewer?StudyInstanceUIDs={UID}"),
        ("stone", f"https://v.example/stone-webviewer/index.html?study={UID}"),
        ("iid", f"https://v.example/IHEInvokeImageDisplay?requestType=STUDY&studyUID={UID}"),
    ],
)
def test_each_template_renders_the_documented_url(name: str, expected: str) -> None:
    viewer = _configure(base_urls={name: "https://v.example"}, default=name)[name]
    assert render_viewer(viewer, {"study_uid": UID}) == expected


def test_settings_choose_override_and_add_viewers() -> None:
    viewers = _configure(
        enabled=["stone", "mine"],
        default="mine",
        templates={"mine": "https://mine.example/show/{study_uid}"},
        base_urls={"stone": "https://orthanc.example"},
    )
    assert list(viewers) == ["stone", "mine"]
    assert viewers["stone"].base_url == "https://orthanc.example"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"enabled": ["nope"]}, "BRIDGE_VIEWERS"),
        (OHIF_ONLY, "BRIDGE_DEFAULT_VIEWER"),
        ({"enabled": ["ohif"]}, "BRIDGE_VIEWER_URLS"),
        ({"templates": {"x": "{base_url}/{patient_name}"}}, "BRIDGE_VIEWER_TEMPLATES"),
        ({"templates": {"x": "javascript:alert(1)//{study_uid}"}}, "BRIDGE_VIEWER_TEMPLATES"),
        ({"base_urls": {"nope": "https://x"}}, "BRIDGE_VIEWER_URLS"),
    ],
)
def test_bad_viewer_settings_fail_naming_the_setting(kwargs: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        _configure(**kwargs)


def test_only_configured_viewers_are_offered_never_the_tables_example_bases() -> None:
    assert _configure() == {}
    viewers = _configure(base_urls={"stone": "https://orthanc.example"}, default="stone")
    assert list(viewers) == ["stone"]
    assert all("localhost" not in v.base_url for v in viewers.values())


def test_a_broken_table_is_a_configuration_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "viewers.yaml").write_text("title: x\nviewers: {a: {template: '{nope}'}}\n")
    with pytest.raises(ConfigurationError, match="viewers.yaml"):
        load_viewer_table(tmp_path)
