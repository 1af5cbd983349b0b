"""The sync's policies: how subjects, orders, writes, deletes and change detection behave.

Defined with the settings that choose them (bridge/config/choices.py), which sit below the sync.
"""

from __future__ import annotations

from bridge.config.choices import (
    ChangeSourceKind,
    DeletePolicy,
    DemographicsCheck,
    DosePolicy,
    MissingModality,
    OrderPolicy,
    PatientPolicy,
    WriteStrategy,
)

__all__ = [
    "ChangeSourceKind",
    "DeletePolicy",
    "DemographicsCheck",
    "DosePolicy",
    "MissingModality",
    "OrderPolicy",
    "PatientPolicy",
    "WriteStrategy",
]
