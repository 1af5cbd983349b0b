"""AuditEvents: valid FHIR, the BALP shape, no patient data in the log line, one per window."""

from __future__ import annotations

from datetime import UTC, datetime

from fhir.resources.R4B.auditevent import AuditEvent

from bridge.audit.events import Access, audit_event, log_line
from bridge.audit.trail import AuditTrail
from bridge.config import AuditMode

WHEN = datetime(2026, 11, 29, 21, 0, tzinfo=UTC)


def access(**changes: object) -> Access:
    values: dict[str, object] = {
        "action": "image-read",
        "outcome": "success",
        "recorded": WHEN,
        "caller_method": "jwt",
        "user": "dr-who",
        "client_id": "viewer-app",
        "patient": "p1",
        "study_fhir_id": "s1",
        "study_uid": "1.2.3",
        "address": "127.0.0.1",
    }
    values.update(changes)
    return Access(**values)  # type: ignore[arg-type]


def test_an_access_becomes_a_valid_audit_event() -> None:
    event = audit_event(access(outcome="refused", reason="another patient"), event_id="e1")
    AuditEvent.model_validate(event)  # R4B and R4 share AuditEvent's shape
    assert event["outcome"] == "4" and event["outcomeDesc"] == "another patient"
    assert event["recorded"] == "2026-11-29T21:00:00Z"
    assert event["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientRead")
    assert [a["requestor"] for a in event["agent"]] == [True, False, False]
    assert event["agent"][0]["network"] == {"address": "127.0.0.1", "type": "2"}
    assert event["entity"][0]["what"] == {"reference": "Patient/p1"}
    assert event["entity"][1]["what"]["identifier"]["value"] == "urn:oid:1.2.3"


def test_a_query_without_a_user_or_study_is_still_valid() -> None:
    event = audit_event(
        access(action="image-query", user=None, client_id=None, study_fhir_id=None, study_uid=None)
    )
    AuditEvent.model_validate(event)
    assert event["action"] == "E" and event["subtype"][0]["code"] == "search"
    assert [e["what"] for e in event["entity"]] == [{"reference": "Patient/p1"}]


def test_the_log_line_names_no_patient_or_user() -> None:
    line = log_line(access())
    assert "p1" not in line and "dr-who" not in line
    assert "study_uid=1.2.3" in line and "outcome=success" in line


def test_repeats_within_the_window_are_one_event() -> None:
    now = [0.0]
    trail = AuditTrail(AuditMode.FHIR, window=60, clock=lambda: now[0])
    assert trail.record(access())
    assert not trail.record(access())
    assert trail.record(access(outcome="refused"))  # a refusal is its own event
    assert trail.record(access(client_id="other-app"))  # another client is another caller
    now[0] = 61.0
    assert trail.record(access())
    assert not AuditTrail(AuditMode.OFF).record(access())


def test_a_repeat_is_known_before_its_access_is_made_and_an_operators_every_retry_counts() -> None:
    now = [0.0]
    trail = AuditTrail(AuditMode.LOG, window=60, clock=lambda: now[0])
    first = access()
    assert not trail.repeats(first.window_key())
    assert trail.record(first)
    assert trail.repeats(access().window_key())  # the same caller, action, study and outcome
    assert trail.repeats(access(recorded=datetime(2027, 1, 1, tzinfo=UTC)).window_key())  # not by the time
    assert not trail.repeats(access(study_uid="1.2.4").window_key())
    now[0] = 61.0
    assert not trail.repeats(access().window_key())
    retry = access(action="operator-retry")
    assert retry.window_key() is None
    assert trail.record(retry) and trail.record(retry)  # each one counts, however close
    assert not trail.repeats(None)
    assert AuditTrail(AuditMode.OFF).repeats(access().window_key())  # off: nothing is ever noted
