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
from bridge.config.source import ENV_PREFIX
from bridge.errors import ConfigurationError


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the known name closest to a mistyped one, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _file_lines(path: str) -> dict[tuple[str, ...], int]:
    """Each key path of a YAML config file (nested mappings too) -> its line, counted from 1."""
    try:
        with open(path, encoding="utf-8") as stream:
            root = yaml.compose(stream, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
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
