"""The layers contract (pyproject.toml, [tool.importlinter]): the code keeps it, and the check bites.

Also the sizes issue 24 set: no module over 500 lines, ``create_app`` under 60.

A module may import from the layers below its own, never from one above (docs/architecture.md). CI
runs `lint-imports` too (.ci/run); these tests make the plain test command fail on a broken layer,
and prove that neither an upward import nor a package left out of the contract slips through.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bridge.api.app import create_app

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _layers(pyproject: Path) -> set[str]:
    """The packages and modules under bridge/ the layers contract in ``pyproject`` names."""
    config = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "layers"]
    return {name.strip() for layer in contract["layers"] for name in layer.replace(":", "|").split("|")}


def _parts(package: Path) -> set[str]:
    """The package's top-level modules and subpackages."""
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    return modules | {p.name for p in package.iterdir() if (p / "__init__.py").exists()}


def _lint(checkout: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the checkout's bridge package, against the checkout's pyproject.toml."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "pyproject.toml"],
        cwd=checkout,  # lint-imports puts the working directory first on the path: this copy's bridge
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the bridge package and its pyproject.toml, to break on purpose."""
    shutil.copytree(ROOT / "bridge", tmp_path / "bridge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_code_keeps_its_layers() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(checkout: Path) -> None:
    # The state store's values reaching up into the sync worker: the kind of import the contract forbids.
    records = checkout / "bridge" / "state" / "records.py"
    records.write_text(records.read_text() + "\nfrom bridge.sync.worker import SyncWorker\n")

    result = _lint(checkout)

    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "bridge.state is not allowed to import bridge.sync" in result.stdout
    assert "bridge.state.records -> bridge.sync.worker" in result.stdout


def test_the_copy_used_above_passes_unbroken(checkout: Path) -> None:
    # The failure above is the added import's, not the copy's: the untouched copy keeps the contract.
    assert _lint(checkout).returncode == 0


def test_every_part_of_the_package_has_a_layer() -> None:
    # A package or module left out of the layers is not checked at all, so each must have one.
    layered, parts = _layers(ROOT / "pyproject.toml"), _parts(ROOT / "bridge")

    assert parts - layered == set(), "give these a layer in pyproject.toml [tool.importlinter]"
    assert layered - parts == set(), "these layers name nothing in bridge/"


def test_a_contract_missing_a_layer_is_caught(checkout: Path) -> None:
    # lint-imports alone passes a contract that leaves "sync" out (sync is then simply unchecked)...
    config = checkout / "pyproject.toml"
    config.write_text(config.read_text().replace('    "sync",\n', "", 1))
    assert _lint(checkout).returncode == 0

    # ...so the test above is what fails on it, naming the package left out.
    assert _parts(checkout / "bridge") - _layers(config) == {"sync"}


MOST_LINES = 500  # issue 24: a module a newcomer reads whole


def _too_long(package: Path) -> dict[str, int]:
    """The package's modules over MOST_LINES lines, with their lengths."""
    lengths = {
        module.relative_to(package.parent).as_posix(): len(module.read_text().splitlines())
        for module in package.rglob("*.py")
    }
    return {name: n for name, n in lengths.items() if n > MOST_LINES}


def test_no_module_is_over_500_lines() -> None:
    assert _too_long(ROOT / "bridge") == {}


def test_a_module_over_500_lines_is_caught(tmp_path: Path) -> None:
    package = tmp_path / "bridge"
    package.mkdir()
    (package / "short.py").write_text("x = 1\n" * MOST_LINES)
    (package / "long.py").write_text("x = 1\n" * (MOST_LINES + 1))
    assert _too_long(package) == {"bridge/long.py": MOST_LINES + 1}


def test_create_app_reads_at_a_glance() -> None:
    lines, _ = inspect.getsourcelines(create_app)
    assert len(lines) < 60, f"create_app is {len(lines)} lines: move wiring into api/services.py"
