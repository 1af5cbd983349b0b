"""A small world for sync tests: a fake archive and FHIR server, a real store, and fresh workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bridge.mapping.context import MappingContext
from bridge.mapping.imaging_study import imaging_study_id
from bridge.state.store import SqlStore
from bridge.sync.link import Linker
from bridge.sync.policy import DemographicsCheck, OrderPolicy, PatientPolicy, WriteStrategy
from bridge.sync.publisher import Publisher
from bridge.sync.report import RunReport
from bridge.sync.worker import SyncWorker
from tests.builders import context, series_row, study_row, uid
from tests.unit.fakes import FakeFhir, FakeSource


@dataclass
class World:
    """One archive, one FHIR server, one store; ``run`` is one `bridge sync` (a fresh worker)."""

    store: SqlStore
    source: FakeSource = field(default_factory=FakeSource)
    fhir: FakeFhir = field(default_factory=FakeFhir)
    ctx: MappingContext = field(default_factory=context)
    policy: PatientPolicy = PatientPolicy.MATCH_OR_CREATE
    order_policy: OrderPolicy = OrderPolicy.NONE
    strategy: WriteStrategy = WriteStrategy.CLIENT_ID
    demographics: DemographicsCheck = DemographicsCheck.PARK
    batch_size: int = 100  # used only when the fake FHIR server lists batch (fhir.batches)

    def add(self, n: int, *, series: list[dict[str, Any]] | None = None, **study_kwargs: Any) -> str:
        study_kwargs.setdefault("patient_id", f"PID{n}")
        row = study_row(study_uid=uid(n), **study_kwargs)
        self.source.add(row, [series_row(series_uid=uid(n, 1))] if series is None else series)
        return uid(n)

    def worker(self, **options: Any) -> SyncWorker:
        linker = Linker(
            self.fhir,
            self.ctx,
            patient_policy=self.policy,
            order_policy=self.order_policy,
            write_strategy=self.strategy,
            demographics=self.demographics,
            store=self.store,
        )
        publisher = Publisher(
            self.fhir, self.store, self.ctx, write_strategy=self.strategy, batch_size=self.batch_size
        )
        return SyncWorker(self.source, linker, publisher, self.store, self.ctx, **options)

    async def run(self) -> RunReport:
        return await self.worker(concurrency=3).run()

    def study(self, study_uid: str) -> dict[str, Any]:
        if self.strategy is WriteStrategy.CLIENT_ID:
            return self.fhir.resources[("ImagingStudy", imaging_study_id(self.ctx, study_uid))]
        [found] = [
            r
            for r in self.fhir.of_type("ImagingStudy")
            if r["identifier"][0]["value"] == f"urn:oid:{study_uid}"
        ]
        return found


def parked(world: World) -> dict[str, Any]:
    return {p.study_uid: p for p in world.store.parked(world.ctx.source_name)}
