"""Loading the settings: ``load_settings`` turns any problem into a ConfigurationError naming the setting."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import SettingsError

from bridge.config.settings import CONFIG_FILE_VARIABLE, UPSTREAMS, Settings, nested_models, setting_paths
from bridge.config.source import ENV_PREFIX, SourceEntryError, is_per_source
from bridge.errors import ConfigurationError


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the known name closest to a mistyped one, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _file_lines(path: str) -> dict[tuple[str, ...], int]:
    """Each key path of a YAML config file -> its line, counted from 1.

    Nested mappings give longer paths (``("fhir", "auth")``); a list's items are at their index
    (``("sources", "0")``, the line the item starts on), so each ``sources`` entry's keys are too.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            root = yaml.compose(stream, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                path_ = (*prefix, str(index))
                lines[path_] = item.start_mark.line + 1
                walk(item, path_)
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                path_ = (*prefix, str(key.value).lower())
                lines[path_] = key.start_mark.line + 1
                walk(value, path_)

    if root is not None:
        walk(root, ())
    return lines


def _message(error: Mapping[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return "is required but not set"
    if error["type"] == "url_parsing" and "relative URL without a base" in message:
        # pydantic's words for "no scheme": say what to write instead.
        return "is not an absolute URL: write it with its scheme, e.g. https://host/path"
    return message


def _describe(
    error: Mapping[str, Any], file_lines: Mapping[tuple[str, ...], int], config_file: str | None
) -> str:
    """One error, naming the variable, or the config file's key and line where it came from."""
    entry = (error.get("ctx") or {}).get("error")
    if isinstance(entry, SourceEntryError):
        return _describe_entry(entry, file_lines, config_file)
    loc = tuple(str(part).lower() for part in error["loc"])
    if not loc or (len(loc) == 1 and loc[0] in nested_models() and error["type"] == "value_error"):
        return _message(error)  # a check across settings (all, or a group's) names them in its message
    flat = _flat_name(loc)
    env_name = ENV_PREFIX + flat.upper()
    in_file = next((key for key in (loc, (flat,)) if key in file_lines), None)
    known = setting_paths()
    if in_file is not None and env_name not in {k.upper() for k in os.environ}:
        where = f"{CONFIG_FILE_VARIABLE} {config_file}, line {file_lines[in_file]}: key {'.'.join(in_file)}"
        if error["type"] == "extra_forbidden":
            return f"{where}: is not a known setting{_did_you_mean(flat, known)}"
        return f"{where}: {_message(error)}"
    if error["type"] == "extra_forbidden":
        return f"{env_name}: is not a known setting{_did_you_mean(env_name, _known_variables())}"
    return f"{env_name}: {_message(error)}"


def _describe_entry(
    entry: SourceEntryError, file_lines: Mapping[tuple[str, ...], int], config_file: str | None
) -> str:
    """What is wrong with a ``sources`` entry: in the config file, each key's line; a likely key."""
    from_file = config_file is not None and f"{ENV_PREFIX}SOURCES" not in {k.upper() for k in os.environ}
    at = ("sources", str(entry.index))
    described = []
    for problem in entry.problems:
        flat = "_".join(problem.key).lower()
        reason = problem.reason()
        if problem.kind == "extra_forbidden":
            reason += _did_you_mean(flat, _source_keys())
        elif problem.kind != "not_per_source":
            reason = _message({"type": problem.kind, "msg": problem.message})
        keys = [(*at, *(p.lower() for p in problem.key)), (*at, flat)] if problem.key else []
        in_file = next((key for key in keys if key in file_lines), None) if from_file else None
        # A key the file does not hold (a value the entry inherits) is pointed at by its entry.
        key = ".".join(in_file[2:]) if in_file is not None else flat
        what = f"{entry.where}, key {key}" if key else entry.where
        line = file_lines.get(in_file or at) if from_file else None
        described.append(
            f"{CONFIG_FILE_VARIABLE} {config_file}, line {line}: {what}: {reason}"
            if line is not None
            else f"{what}: {reason}"
        )
    return "; ".join(described)


@lru_cache(maxsize=1)
def _source_keys() -> list[str]:
    """The keys a ``sources`` entry takes: its name and the per-source settings, by flat name."""
    return ["name", *(flat for flat in setting_paths() if is_per_source(flat))]


def _flat_name(loc: tuple[str, ...]) -> str:
    """The flat name of the setting at ``loc`` (``("gateway", "enabled")`` is ``gateway``)."""
    flat = _flat_names().get(loc[:2])
    return "_".join(loc) if flat is None else "_".join((flat, *loc[2:]))


@lru_cache(maxsize=1)
def _flat_names() -> dict[tuple[str, ...], str]:
    return {path: flat for flat, path in setting_paths().items()}


def _known_variables() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in setting_paths()} | {CONFIG_FILE_VARIABLE}


# What a command that reads only the state store puts in place of an upstream URL left unset.
UNSET_URL = "http://unset.invalid/"


def _only_upstream_urls_missing(exc: ValidationError) -> list[str] | None:
    """The upstreams whose URL is missing, if that is all that is wrong."""
    missing = []
    for error in exc.errors():
        if error["type"] != "missing" or tuple(error["loc"]) not in {(u, "url") for u in UPSTREAMS}:
            return None
        missing.append(str(error["loc"][0]))
    return missing


def load_store_settings() -> Settings:
    """The settings of a command that reads only the state store (``bridge status``).

    The archive's and the FHIR server's URLs may be unset (they are then ``UNSET_URL``, never
    used); every other setting is checked as usual, so a bad one still stops the command.
    """
    try:
        return load_settings()
    except _UpstreamUrlsMissing as missing:
        return load_settings(**{f"{name}_url": UNSET_URL for name in missing.upstreams})


class _UpstreamUrlsMissing(ConfigurationError):
    """Only the upstreams' URLs are missing (a store-only command may go on without them)."""

    def __init__(self, message: str, upstreams: list[str]) -> None:
        super().__init__(message)
        self.upstreams = upstreams


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings, turning any problem into a ConfigurationError naming it."""
    config_file = os.environ.get(CONFIG_FILE_VARIABLE)
    if config_file and not Path(config_file).is_file():
        raise ConfigurationError(f"{CONFIG_FILE_VARIABLE}: no such file: {config_file}")
    known = _known_variables()
    unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        hint = _did_you_mean(unknown[0].upper(), known)
        raise ConfigurationError(f"invalid configuration: {unknown[0]}: is not a known setting{hint}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = _file_lines(config_file) if config_file else {}
        details = "; ".join(_describe(e, lines, config_file) for e in exc.errors())
        upstreams = _only_upstream_urls_missing(exc)
        if upstreams:
            raise _UpstreamUrlsMissing(f"invalid configuration: {details}", upstreams) from None
        raise ConfigurationError(f"invalid configuration: {details}") from None
    except SettingsError as exc:  # a value that is not the JSON a map or list setting needs
        match = re.search(r'field "([a-z0-9_]+)"', str(exc))
        name = ENV_PREFIX + match[1].upper() if match else "a setting"
        raise ConfigurationError(f"invalid configuration: {name}: is not valid JSON") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigurationError(
            f"invalid configuration: {CONFIG_FILE_VARIABLE}: {config_file} is not valid YAML{where}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"invalid configuration: {CONFIG_FILE_VARIABLE}: {config_file} must hold a mapping of "
            f"settings ({type(exc).__name__})"
        ) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once (tests call ``get_settings.cache_clear()``)."""
    return load_settings()
