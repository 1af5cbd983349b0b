"""The dry run's diff: element paths, never values."""

from __future__ import annotations

from bridge.sync.diff import changed_paths


def test_changed_paths_name_elements_never_values() -> None:
    old = {
        "resourceType": "ImagingStudy",
        "meta": {"versionId": "3"},
        "description": "A",
        "series": [{"uid": "1"}],
    }
    new = {
        "resourceType": "ImagingStudy",
        "description": "B",
        "series": [{"uid": "1"}, {"uid": "2"}],
        "basedOn": [{}],
    }
    assert changed_paths(old, new) == ["+basedOn", "~description", "+series[1]"]
    assert changed_paths(new, new) == []
