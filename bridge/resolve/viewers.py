"""The viewer URL templates of ``mappings/viewers.yaml``, validated and merged with the settings."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge.config import Settings
from bridge.errors import ConfigurationError
from bridge.mapping.tables import BUNDLED_MAPPINGS, TableFile, load_table
from bridge.resolve.links import PLACEHOLDERS, ViewerTemplate, template_fields

VIEWERS_FILE = "viewers.yaml"
NAME = r"^[a-z][a-z0-9_-]{0,31}$"
_HTTP_URL = re.compile(r"^https?://[^\s?#]+$")


def _check_template(template: str) -> str:
    template_fields(template)  # raises ValueError naming an unknown placeholder
    if not (template.startswith("{base_url}") or _HTTP_URL.fullmatch(template.split("?")[0].split("{")[0])):
        raise ValueError("a template starts with {base_url} or an absolute http(s) URL")
    return template


class Viewer(BaseModel):
    """One viewer: where it lives and how a study's URL is made."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    title: str = Field(min_length=1)
    source: str = Field(min_length=1, description="where the URL form comes from")
    base_url: str = Field(pattern=_HTTP_URL.pattern)
    template: str

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return _check_template(value)


class ViewerTable(TableFile):
    """The whole file: provenance, the documented placeholders, and the viewers."""

    placeholders: dict[str, str]
    viewers: dict[str, Viewer]

    @field_validator("placeholders")
    @classmethod
    def _documented(cls, value: dict[str, str]) -> dict[str, str]:
        if set(value) != set(PLACEHOLDERS):
            raise ValueError(f"document exactly these placeholders: {', '.join(PLACEHOLDERS)}")
        return value

    @field_validator("viewers")
    @classmethod
    def _names(cls, value: dict[str, Viewer]) -> dict[str, Viewer]:
        for name in value:
            if not re.fullmatch(NAME, name):
                raise ValueError(f"viewer name {name!r} must match {NAME}")
        return value


@lru_cache(maxsize=4)
def load_viewer_table(folder: Path = BUNDLED_MAPPINGS) -> ViewerTable:
    """Load and validate ``viewers.yaml``; a broken file is a ConfigurationError naming it."""
    # The same strict loader as the code tables (duplicate keys refused, errors name the file).
    return load_table(folder / VIEWERS_FILE, ViewerTable)


def configure_viewers(
    table: ViewerTable,
    *,
    enabled: Sequence[str] | None,
    default: str,
    base_urls: Mapping[str, str],
    templates: Mapping[str, str],
) -> dict[str, ViewerTemplate]:
    """The viewers offered, in table order, after the settings' overrides; checks the default."""
    merged: dict[str, tuple[str, str, str]] = {
        name: (v.title, v.template, v.base_url) for name, v in table.viewers.items()
    }
    for name, template in templates.items():
        if not re.fullmatch(NAME, name):
            raise ConfigurationError(f"BRIDGE_VIEWER_TEMPLATES: viewer name {name!r} must match {NAME}")
        try:
            _check_template(template)
        except ValueError as exc:
            raise ConfigurationError(f"BRIDGE_VIEWER_TEMPLATES: {name}: {exc}") from None
        title, _, base = merged.get(name, (name, "", ""))
        merged[name] = (title, template, base)
    for name, url in base_urls.items():
        if name not in merged:
            raise ConfigurationError(f"BRIDGE_VIEWER_URLS: no viewer named {name!r}")
        title, template, _ = merged[name]
        merged[name] = (title, template, url)
    # Only viewers the operator configured: the table's base URLs are examples (localhost), and a
    # link to one would send a clinician, and the study's UID, wherever that name resolves.
    configured = set(base_urls) | set(templates)
    names = [n for n in merged if n in configured] if enabled is None else list(dict.fromkeys(enabled))
    unknown = [n for n in names if n not in merged]
    if unknown:
        raise ConfigurationError(
            f"BRIDGE_VIEWERS: unknown viewer(s) {', '.join(unknown)}; known: {', '.join(merged)}"
        )
    viewers = {}
    for name in names:
        title, template, base = merged[name]
        if "{base_url}" in template and (not base or name not in base_urls):
            raise ConfigurationError(
                f"BRIDGE_VIEWER_URLS: viewer {name!r} needs its base URL (the table's is only an example)"
            )
        viewers[name] = ViewerTemplate(name=name, template=template, base_url=base, title=title)
    if viewers and default not in viewers:
        raise ConfigurationError(
            f"BRIDGE_DEFAULT_VIEWER: {default!r} is not among the viewers offered ({', '.join(viewers)})"
        )
    return viewers


def configured_viewers(settings: Settings) -> dict[str, ViewerTemplate]:
    """The viewers the settings offer (ConfigurationError naming the setting when they cannot)."""
    return configure_viewers(
        load_viewer_table(settings.mappings_dir) if settings.mappings_dir else load_viewer_table(),
        enabled=settings.viewers,
        default=settings.default_viewer,
        base_urls=settings.viewer_urls,
        templates=settings.viewer_templates,
    )
