"""Start-up: each command loads only what it uses, and a current store starts without log noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RUN_AND_LIST_MODULES = """
import json, sys
sys.argv = ["bridge", *sys.argv[1:]]
from bridge.cli import main
try:
    main()
except SystemExit:
    pass
sys.__stdout__.write("\\nMODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})) + "\\n")
"""


def _bridge(
    *args: str, env: dict[str, str] | None = None
) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_MODULES, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES "))), result


def test_help_loads_neither_settings_nor_sync_nor_store_nor_web_stack() -> None:
    loaded, result = _bridge("--help")
    assert "sync" in result.stdout
    heavy = {"pydantic_settings", "pydicom", "sqlalchemy", "alembic", "httpx", "fastapi", "uvicorn", "fhir"}
    assert loaded.isdisjoint(heavy), sorted(loaded & heavy)


def test_sync_never_loads_the_web_stack(tmp_path: Path) -> None:
    env = {
        "BRIDGE_DICOMWEB_URL": "http://127.0.0.1:9/dicom-web",  # nothing listens: the run fails at once
        "BRIDGE_FHIR_URL": "http://127.0.0.1:9/fhir",
        "BRIDGE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "BRIDGE_HTTP_RETRIES": "0",
    }
    loaded, result = _bridge("sync", env=env)
    assert "upstream error" in result.stderr  # it got as far as calling the archive
    assert loaded.isdisjoint({"fastapi", "uvicorn", "starlette"}), sorted(loaded & {"fastapi", "uvicorn"})


def test_status_on_a_current_store_prints_no_migration_lines(tmp_path: Path) -> None:
    env = {
        "BRIDGE_DICOMWEB_URL": "http://pacs.test/dicom-web",
        "BRIDGE_FHIR_URL": "http://ehr.test/fhir",
        "BRIDGE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
    }
    _bridge("status", env=env)  # creates and migrates the store
    _, again = _bridge("status", env=env)
    assert again.returncode == 0, again.stderr
    assert "alembic" not in again.stderr and "migrat" not in again.stderr
