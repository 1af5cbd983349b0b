"""Sync depends on its own interfaces: loading the worker loads no HTTP, SQL or web stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("httpx", "sqlalchemy", "alembic", "fastapi", "uvicorn")


def _loaded_after(module: str) -> set[str]:
    # A fresh interpreter: this test process has imported everything already.
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in json.loads(result.stdout)}


@pytest.mark.parametrize("module", ["bridge.sync.worker", "bridge.sync.publisher", "bridge.sync.scheduler"])
def test_the_sync_side_imports_no_http_sql_or_web_stack(module: str) -> None:
    assert _loaded_after(module).isdisjoint(FORBIDDEN), sorted(_loaded_after(module) & set(FORBIDDEN))
