"""What would change in a FHIR resource: element paths, never values (they may be patient data)."""

from __future__ import annotations

from typing import Any

# Server-kept bookkeeping, not content the bridge decides.
IGNORED = frozenset({"meta", "text", "id"})


def changed_paths(old: Any, new: Any, path: str = "") -> list[str]:
    """Paths that differ between two FHIR JSON values: ``+p`` added, ``-p`` removed, ``~p`` changed."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            if not path and key in IGNORED:
                continue
            where = f"{path}.{key}" if path else key
            if key not in old:
                out.append(f"+{where}")
            elif key not in new:
                out.append(f"-{where}")
            else:
                out.extend(changed_paths(old[key], new[key], where))
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        for index in range(max(len(old), len(new))):
            where = f"{path}[{index}]"
            if index >= len(old):
                out.append(f"+{where}")
            elif index >= len(new):
                out.append(f"-{where}")
            else:
                out.extend(changed_paths(old[index], new[index], where))
        return out
    return [] if old == new else [f"~{path}"]
