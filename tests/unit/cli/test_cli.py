"""The `bridge` command: exit codes and messages an operator sees."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge import __version__
from bridge.cli import app
from bridge.state.records import Published, RunCounts
from bridge.state.store import SqlStore

UNREACHABLE = "http://127.0.0.1:1"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    state = tmp_path / "state.db"
    monkeypatch.setenv("BRIDGE_DICOMWEB_URL", f"{UNREACHABLE}/dicom-web")
    monkeypatch.setenv("BRIDGE_FHIR_URL", f"{UNREACHABLE}/fhir")
    monkeypatch.setenv("BRIDGE_STATE_URL", f"sqlite:///{state}")
    monkeypatch.setenv("BRIDGE_HTTP_RETRIES", "0")
    return state


def flat(text: str) -> str:
    """Console output with the terminal's line wrapping undone."""
    return " ".join(text.split())


def test_missing_settings_exit_2_naming_them(runner: CliRunner) -> None:
    result = runner.invoke(app, ["sync"])
    assert result.exit_code == 2
    message = flat(result.stderr)
    assert "configuration error" in message
    assert "BRIDGE_DICOMWEB_URL" in message
    assert "BRIDGE_FHIR_URL" in message


def test_a_bad_setting_exits_2_naming_it(
    runner: CliRunner, configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_PATIENT_POLICY", "create-everyone")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2
    assert "BRIDGE_PATIENT_POLICY" in flat(result.stderr)


def test_a_mistyped_variable_exits_2_naming_it(
    runner: CliRunner, configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_FHIR_ULR", "http://ehr.test/fhir")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2
    assert "BRIDGE_FHIR_ULR" in flat(result.stderr)


def test_a_mistyped_variable_is_answered_with_the_likely_setting(
    runner: CliRunner, configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_DICOMWEB_URLL", "http://pacs.test/dicom-web")
    result = runner.invoke(app, ["sync"])
    assert result.exit_code == 2
    assert "BRIDGE_DICOMWEB_URLL: is not a known setting (did you mean BRIDGE_DICOMWEB_URL?)" in flat(
        result.stderr
    )


def test_a_config_file_error_names_the_file_key_and_line(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        "# the archive\nfhir_url: http://ehr.test/fhir\ndicomweb_urll: http://pacs.test/dicom-web\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    result = runner.invoke(app, ["sync"])
    assert result.exit_code == 2
    message = flat(result.stderr)
    assert (
        f"{config}, line 3: key dicomweb_urll: is not a known setting (did you mean dicomweb_url?)" in message
    )


def test_a_url_without_a_scheme_gets_a_scheme_hint(
    runner: CliRunner, configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_FHIR_URL", "ehr.example.org/fhir/R4")
    result = runner.invoke(app, ["sync"])
    assert result.exit_code == 2
    message = flat(result.stderr)
    assert "BRIDGE_FHIR_URL: is not an absolute URL: write it with its scheme" in message
    assert "relative URL without a base" not in message


def test_a_store_that_cannot_open_names_its_file_folder_and_setting(
    runner: CliRunner, configured: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-folder" / "state.db"
    monkeypatch.setenv("BRIDGE_STATE_URL", f"sqlite:///{missing}")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 4
    message = "".join(result.stderr.split())  # the long path may be wrapped anywhere
    assert f"(file{missing})" in message
    assert f"thefolder{missing.parent}doesnotexist" in message
    assert "BRIDGE_STATE_URL" in message
    assert "Background on this error" not in message


def test_a_store_that_turned_read_only_exits_4_naming_its_file_and_setting(
    runner: CliRunner, configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SqlStore(f"sqlite:///{configured}").close()  # made by an earlier run
    monkeypatch.setenv("BRIDGE_STATE_URL", f"sqlite:///file:{configured}?mode=ro&uri=true")
    result = runner.invoke(app, ["sync"])  # its first write is the run record: before any peer is asked
    assert result.exit_code == 4, result.stderr
    message = "".join(result.stderr.split())  # the long path may be wrapped anywhere
    assert f"(file{configured})" in message and "BRIDGE_STATE_URL" in message
    assert "readonlydatabase" in message


def test_a_store_url_password_is_never_shown(
    runner: CliRunner, configured: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_STATE_URL", "postgresql+psycopg://bridge:s3cret-pw@127.0.0.1:1/bridge")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 4
    message = flat(result.stderr)
    assert "127.0.0.1:1/bridge" in message and "BRIDGE_STATE_URL" in message
    assert "s3cret-pw" not in message


def test_sync_with_unreachable_servers_exits_3_with_a_clear_message(configured: Path, tmp_path: Path) -> None:
    # A real process, so the exit code and stderr are exactly what an operator's shell sees.
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "sync"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    message = flat(result.stderr)
    assert "upstream error" in message
    assert "127.0.0.1:1" in message
    assert "is running" in message  # says what to check
    assert "Traceback" not in result.stderr


def test_status_json_on_an_empty_store_has_zero_counts(runner: CliRunner, configured: Path) -> None:
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["published"], data["parked"], data["runs"], data["parked_studies"]) == (0, 0, [], [])
    assert data["source"] == "default"


def test_status_json_shows_runs_and_parked_studies(runner: CliRunner, configured: Path) -> None:
    store = SqlStore(f"sqlite:///{configured}")
    run_id = store.start_run("default")
    store.finish_run(
        run_id,
        status="parked",
        counts=RunCounts(seen=2, created=1, parked=1),
        qido_queries=["/studies"],
        series_query="per-study",
    )
    store.record_published_many("default", [Published("1.2.3", "q", "r", "f", "1")])
    store.park(
        "default", "1.2.4", kind="mapping", reason="StudyDate is not a calendar date", attribute="StudyDate"
    )
    store.close()
    data = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert (data["published"], data["parked"]) == (1, 1)
    [run] = data["runs"]
    assert (run["id"], run["status"], run["seen"], run["created"], run["parked"], run["series_query"]) == (
        run_id,
        "parked",
        2,
        1,
        1,
        "per-study",
    )
    table = flat(runner.invoke(app, ["status"]).stdout)
    assert "per-s" in table  # the table's last column (rich may shorten it to the width)
    [parked] = data["parked_studies"]
    assert (parked["study_uid"], parked["attribute"], parked["attempts"]) == ("1.2.4", "StudyDate", 1)


def test_status_as_a_table_names_the_source_and_counts(runner: CliRunner, configured: Path) -> None:
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0
    assert "0 studies published, 0 gone from the archive, 0 parked" in flat(result.stdout)


def test_version_prints_the_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_accept_demographics_needs_a_study_and_exits_2(runner: CliRunner, configured: Path) -> None:
    result = runner.invoke(app, ["retry", "--accept-demographics"])
    assert result.exit_code == 2
    assert "--accept-demographics needs --study" in result.stderr


def _two_source_store(path: Path) -> None:
    """A store as two sources' workers leave it: runs of several kinds, one failed, parked studies."""
    store = SqlStore(f"sqlite:///{path}")
    first = store.start_run("pacs-a", kind="incremental")
    store.finish_run(first, status="ok", counts=RunCounts(seen=3, created=3), qido_queries=["/studies"])
    store.record_published_many("pacs-a", [Published(f"1.2.{i}", "q", "r", f"f{i}", "1") for i in range(3)])
    for uid in ("1.3.1", "1.3.2"):
        store.park(
            "pacs-a",
            uid,
            kind="link",
            reason="IssuerOfPatientID has no identifier system in BRIDGE_PATIENT_ISSUER_SYSTEMS",
            attribute="IssuerOfPatientID",
        )
    failed = store.start_run("vna-b", kind="reconcile")
    store.finish_run(
        failed, status="failed", counts=RunCounts(), qido_queries=[], error="UpstreamError: down"
    )
    store.close()


def test_status_reads_only_the_state_store_and_shows_every_source(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    _two_source_store(state)
    monkeypatch.setenv("BRIDGE_STATE_URL", f"sqlite:///{state}")  # and no archive or FHIR URL
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.stderr
    text = flat(result.stdout)
    assert "source pacs-a: studies parked; last successful run" in text
    assert "ago, incremental); lag: poll up to " in text
    assert "(since the last successful poll); 3 studies published, 0 gone from the archive, 2 parked" in text
    assert "2 parked (IssuerOfPatientID): IssuerOfPatientID has no identifier system" in text
    assert "source vna-b: failing; no successful run yet; lag: poll never succeeded; 0 studies" in text
    assert "source default" not in text  # no configured source without an archive URL
    assert "UTC" in text  # times say their zone
    assert " kind " in text  # the runs table has the run kind (JSON below gives it whole)


def test_status_json_gives_each_sources_health_with_zoned_times(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    _two_source_store(state)
    monkeypatch.setenv("BRIDGE_STATE_URL", f"sqlite:///{state}")
    data = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert data["source"] == "all"
    health = {s["name"]: s for s in data["sources"]}
    assert health["vna-b"]["health"] == "failing" and health["vna-b"]["last_successful_run"] is None
    success = health["pacs-a"]["last_successful_run"]
    assert success["kind"] == "incremental" and 0 <= success["age_seconds"] < 600
    assert success["finished_at"].endswith("+00:00")
    assert [(g["attribute"], g["count"]) for g in health["pacs-a"]["parked_by_reason"]] == [
        ("IssuerOfPatientID", 2)
    ]
    assert all(r["started_at"].endswith("+00:00") for r in data["runs"])
    assert [(r["source"], r["kind"]) for r in data["runs"]] == [
        ("vna-b", "reconcile"),
        ("pacs-a", "incremental"),
    ]
    narrowed = json.loads(runner.invoke(app, ["status", "--json", "--source", "vna-b"]).stdout)
    assert [s["name"] for s in narrowed["sources"]] == ["vna-b"]
    assert [r["source"] for r in narrowed["runs"]] == ["vna-b"]


def test_status_help_shows_json_as_a_plain_flag(runner: CliRunner) -> None:
    result = runner.invoke(app, ["status", "--help"])
    assert result.exit_code == 0
    assert "--json" in result.stdout
    assert "<bool>" not in result.stdout


def test_dash_dash_version_prints_the_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_status_headline_gives_the_lag_of_each_path_the_waiting_pushes_and_the_last_measured(
    runner: CliRunner, configured: Path
) -> None:
    store = SqlStore(f"sqlite:///{configured}")
    store.queue_push("1.2.9", time.time() - 30, 100)
    measured_at = time.time() - 3 * 3600
    store.save_checkpoint(
        "default", "lag-push", json.dumps({"seconds": 1.8, "studies": 3, "at": measured_at})
    )
    store.save_checkpoint(
        "default", "lag-feed", json.dumps({"seconds": 4.25, "studies": 1, "at": measured_at})
    )
    store.close()
    [health] = json.loads(runner.invoke(app, ["status", "--json"]).stdout)["sources"]
    lag = health["current_lag"]
    assert lag["poll"]["seconds"] is None and lag["poll"]["run"] is None  # never polled
    assert "age of the last successful run that polled the archive" in lag["poll"]["measured_as"]
    push = lag["push"]
    assert push["waiting"] == 1 and 29 <= push["oldest_waiting_seconds"] < 90
    assert (push["last_measured"]["seconds"], push["last_measured"]["studies"]) == (1.8, 3)
    assert push["last_measured"]["measured_at"].endswith("+00:00")
    assert 3 * 3600 - 1 <= push["last_measured"]["age_seconds"] < 3 * 3600 + 300
    assert lag["feed"]["last_measured"]["seconds"] == 4.25
    text = flat(runner.invoke(app, ["status"]).stdout)
    # In the headline, path by path; the push path's lag right now is its oldest waiting push.
    headline = next(line for line in text.split("source ")[1:] if line.startswith("default:"))
    assert "lag: poll never succeeded, push " in headline
    assert "s now (1 waiting; last measured 1.8 s, 3.0 h ago), feed 4.25 s (measured 3.0 h ago);" in headline


def _age_run(state: Path, run_id: int, hours: float) -> None:
    """Move a run's end back in time (the store stamps runs with the clock)."""
    with sqlite3.connect(state) as db:
        db.execute(
            "UPDATE runs SET finished_at = datetime(finished_at, ?) WHERE id = ?",
            (f"-{hours * 3600:.0f} seconds", run_id),
        )


def test_the_poll_lag_is_the_age_of_the_last_poll_not_of_a_later_retry(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    store = SqlStore(f"sqlite:///{state}")
    poll = store.start_run("pacs-a", kind="incremental")
    store.finish_run(poll, status="ok", counts=RunCounts(seen=2, created=2), qido_queries=["/studies"])
    retry = store.start_run("pacs-a", kind="retry")
    store.finish_run(retry, status="ok", counts=RunCounts(seen=1, updated=1), qido_queries=[])
    store.close()
    _age_run(state, poll, hours=2)
    monkeypatch.setenv("BRIDGE_STATE_URL", f"sqlite:///{state}")
    [health] = json.loads(runner.invoke(app, ["status", "--json"]).stdout)["sources"]
    assert (
        health["last_successful_run"]["kind"] == "retry"
        and health["last_successful_run"]["age_seconds"] < 600
    )
    poll_lag = health["current_lag"]["poll"]
    assert poll_lag["run"]["id"] == poll and poll_lag["run"]["kind"] == "incremental"
    assert 7100 < poll_lag["seconds"] < 7800
    assert set(health["current_lag"]) == {"poll"}  # no push or feed used: not shown
    text = flat(runner.invoke(app, ["status"]).stdout)
    assert "ago, retry); lag: poll up to 2.0 h (since the last successful poll); 0 studies published" in text
