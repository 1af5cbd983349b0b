"""`bridge check`'s reading of a CapabilityStatement: what the write strategy needs, named when missing."""

from __future__ import annotations

from typing import Any

from bridge.cli.check import Report, Severity, _strategy
from bridge.sync.policy import WriteStrategy


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
