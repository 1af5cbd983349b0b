"""`bridge check`'s reading of a CapabilityStatement: what the write strategy needs, named when missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.cli.check import Report, Severity, _strategy, check_store
from bridge.state.store import SqlStore
from bridge.sync.policy import WriteStrategy
from tests.unit.settings_factory import make_settings


def statement(**imaging_study: Any) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "rest": [{"resource": [{"type": "ImagingStudy", **imaging_study}]}],
    }


def test_a_server_that_will_not_create_by_put_is_told_to_use_conditional_writes() -> None:
    report = Report()
    _strategy(WriteStrategy.CLIENT_ID, statement(updateCreate=False), report)
    [finding] = report.findings
    assert finding.severity is Severity.CONFIGURATION and report.worst == 2
    assert "BRIDGE_WRITE_STRATEGY=client-id" in finding.text and "set it to 'conditional'" in finding.text


def test_a_server_without_conditional_update_is_told_to_use_client_ids() -> None:
    report = Report()
    _strategy(WriteStrategy.CONDITIONAL, statement(conditionalUpdate=False), report)
    [finding] = report.findings
    assert "BRIDGE_WRITE_STRATEGY=conditional" in finding.text and "'client-id'" in finding.text


def test_a_server_that_does_not_update_imaging_studies_at_all_is_said_so() -> None:
    report = Report()
    _strategy(WriteStrategy.CLIENT_ID, statement(interaction=[{"code": "read"}, {"code": "create"}]), report)
    [finding] = report.findings
    assert "does not update ImagingStudy" in finding.text


def test_a_statement_that_allows_the_writes_or_says_nothing_finds_nothing() -> None:
    report = Report()
    _strategy(WriteStrategy.CLIENT_ID, statement(interaction=[{"code": "update"}], updateCreate=True), report)
    _strategy(WriteStrategy.CONDITIONAL, {"resourceType": "CapabilityStatement"}, report)
    assert report.findings == [] and report.worst == 0


def test_a_store_that_opens_read_only_is_a_store_finding_naming_its_file_and_setting(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqlStore(f"sqlite:///{path}").close()  # made, and migrated, by a run before
    settings = make_settings(state_url=f"sqlite:///file:{path}?mode=ro&uri=true")  # a read-only open
    report = Report()
    assert check_store(settings, report) is None
    [finding] = report.findings
    assert finding.peer == "state store" and finding.severity is Severity.STORE and report.worst == 4
    assert f"(file {path}) opens but takes no write" in finding.text
    assert "readonly database" in finding.text and "BRIDGE_STATE_URL" in finding.text
