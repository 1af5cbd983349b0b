"""Settings: one validated ``Settings`` object from ``BRIDGE_*`` variables and an optional YAML file.

The package only hands names on: ``upstream`` (how an upstream is reached), ``source`` (what may
differ between DICOMweb sources), ``groups`` (the other settings by group), ``settings`` (the whole,
and the flat names), ``load`` (loading and its messages), ``files`` and ``hosts`` (pure checks).
"""

from bridge.config.files import SigningAlg
from bridge.config.groups import AuditMode
from bridge.config.load import UNSET_URL, get_settings, load_settings, load_store_settings
from bridge.config.settings import CONFIG_FILE_VARIABLE, UPSTREAMS, Settings, setting_names, setting_paths
from bridge.config.source import (
    ENV_PREFIX,
    PER_SOURCE_SETTINGS,
    PerSourceSettings,
    SourceSettings,
    is_per_source,
)
from bridge.config.upstream import ArchiveSettings, AuthMode, FhirServerSettings, UpstreamSettings

__all__ = [
    "CONFIG_FILE_VARIABLE",
    "ENV_PREFIX",
    "PER_SOURCE_SETTINGS",
    "UNSET_URL",
    "UPSTREAMS",
    "ArchiveSettings",
    "AuditMode",
    "AuthMode",
    "FhirServerSettings",
    "PerSourceSettings",
    "Settings",
    "SigningAlg",
    "SourceSettings",
    "UpstreamSettings",
    "get_settings",
    "is_per_source",
    "load_settings",
    "load_store_settings",
    "setting_names",
    "setting_paths",
]
