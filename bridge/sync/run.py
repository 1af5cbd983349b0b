"""The state of one run (or dry run): made for the run, dropped with it, never kept on the worker."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.mapping.records import StudyRecord, digest
from bridge.state.records import KnownStudy, Published
from bridge.sync.assemble import StudyRecords
from bridge.sync.link import RunLinker
from bridge.sync.report import RunReport


def content_fingerprint(resource: dict[str, Any], observations: Sequence[dict[str, Any]] = ()) -> str:
    """What the store remembers of a study's published content: its ImagingStudy and dose Observations.

    A study without Observations keeps the digest of its ImagingStudy alone, as before they existed.
    """
    return digest([resource, *observations]) if observations else digest(resource)


@dataclass
class StudyWork:
    """A changed study on its way through the pipeline."""

    study: StudyRecord
    known: KnownStudy | None
    qido_fingerprint: str
    records: StudyRecords | None = None
    resource: dict[str, Any] | None = None
    fallbacks: list[str] = field(default_factory=list)
    done: bool = False  # recorded already (unchanged resource) or parked
    moved: bool = False  # every row of the study now names another patient identity (a correction)
    observations: list[dict[str, Any]] = field(default_factory=list)  # dose summaries, with the study


@dataclass
class PageWork:
    """What the studies of one page leave to do once they are all through."""

    published: list[Published] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)
    writes: list[StudyWork] = field(default_factory=list)  # mapped and validated, to be written


@dataclass
class RunState:
    """What one run carries from page to page.

    ``sweep``: the run covers every study matching these filters, so the source may fetch all their
    series at once; it does so for the first page with several changed studies (then ``sweep`` is
    None and ``swept`` says whether the source kept a sweep, to end with the run).
    """

    report: RunReport
    linker: RunLinker
    limit: asyncio.Semaphore
    endpoint: str = ""
    sweep: Mapping[str, str] | None = None
    swept: bool = False
    conflicted: set[str] = field(default_factory=set)  # studies parked for conflicting identity
