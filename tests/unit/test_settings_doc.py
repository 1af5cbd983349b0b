"""docs/settings.md and the chart's settings schema are generated from Settings and must be current."""

from __future__ import annotations

import importlib.util
import re
import sys
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic_core import PydanticUndefined

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


# How the README says "no value": the setting is unset (None), empty, or computed at start-up.
_NO_VALUE = ("none", "unset", "system default", "host zone", "bundled", "those ", "`dicomweb_url`")


def _readme_rows() -> list[tuple[str, str, str]]:
    """(names cell, default cell, line) of every README settings-table row."""
    rows = []
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`BRIDGE_"):
            rows.append((cells[0], cells[1], line))
    return rows


def _names(cell: str, known: set[str]) -> list[tuple[str, int]]:
    """The settings a names cell documents, each with the index of its part in the cell.

    `BRIDGE_HTTP_TIMEOUT` / `_RETRIES`: a suffix replaces the end of the first name; `<U>` is each
    upstream; `_CLIENT_SECRET(_FILE)` is both settings.
    """
    parts = [p.strip().strip("`") for p in cell.split(" / ")]
    first = parts[0].removeprefix("BRIDGE_")
    names: list[tuple[str, int]] = []
    for upstream in ("DICOMWEB", "FHIR") if "<U>" in first else ("",):
        base = first.replace("<U>", upstream).lower()
        names.append((base, 0))
        for index, part in enumerate(parts[1:], start=1):
            if part.startswith("BRIDGE_"):
                names.append((part.removeprefix("BRIDGE_").lower(), index))
                continue
            suffix = part.lstrip("_").lower()
            variants = dict.fromkeys(
                [re.sub(r"\(.*?\)", "", suffix), suffix.replace("(", "").replace(")", "")]
            )
            for variant in variants:
                words = base.split("_")
                # The longest prefix of the first name that makes a setting with this suffix.
                candidates = ["_".join([*words[:k], variant]) for k in range(len(words) - 1, -1, -1)]
                names.append((next((c for c in candidates if c in known), f"{base}?{variant}"), index))
    return names


def _documented(text: str) -> object:
    value = text.strip()
    if value.lower().startswith(_NO_VALUE):
        return None
    value = value.strip("`")
    if value in ("true", "false"):
        return value == "true"
    if value == "{}":
        return {}
    if re.fullmatch(r"-?\d+(\.\d+)?", value):
        return float(value)
    if "," in value:
        return [v.strip() for v in value.split(",")]
    return value


def _real(field: Any) -> object:
    default = field.default_factory() if field.default_factory is not None else field.default
    if default in (None, PydanticUndefined) or default == [] or default == "":
        return None
    if isinstance(default, bool):
        return default
    if isinstance(default, int | float):
        return float(default)
    if isinstance(default, Enum):
        return default.value
    if isinstance(default, dict) and not default:
        return {}
    if isinstance(default, list):
        return [str(v) for v in default]
    return str(default)


def test_every_default_in_the_readme_tables_is_the_real_default() -> None:
    from bridge.config import setting_names

    fields = setting_names()
    rows = _readme_rows()
    assert len(rows) > 30, "the README's settings tables were not found"
    wrong = []
    for names_cell, default_cell, line in rows:
        names = _names(names_cell, set(fields))
        defaults = [d.strip() for d in default_cell.split(" / ")]
        parts = max(index for _, index in names) + 1
        assert len(defaults) in (1, parts), f"one default, or one per setting: {line}"
        for name, index in names:
            text = defaults[index if len(defaults) > 1 else 0]
            if name not in fields:
                wrong.append(f"BRIDGE_{name.upper()} is documented but is no setting ({line})")
                continue
            field = fields[name]
            if text == "required":
                if not field.is_required() and field.default is not None:
                    wrong.append(f"BRIDGE_{name.upper()} is documented as required")
                continue
            documented, real = _documented(text), _real(field)
            if documented != real:
                wrong.append(f"BRIDGE_{name.upper()}: README says {text}, the default is {real!r}")
    assert not wrong, "\n".join(wrong)
