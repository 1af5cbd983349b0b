"""docs/settings.md and the chart's settings schema are generated from Settings and must be current."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_doc", ROOT / "scripts" / "settings_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("settings_doc", module)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_current() -> None:
    generator = _generator()
    for path, text in generator.outputs().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run `python scripts/settings_doc.py`"
        )


def test_every_setting_is_documented_with_its_variable() -> None:
    from bridge.config import setting_names

    doc = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert "BRIDGE_FHIR_CLIENT_ID" in {f"BRIDGE_{name.upper()}" for name in setting_names()}
    for name in setting_names():
        assert f"`BRIDGE_{name.upper()}`" in doc
