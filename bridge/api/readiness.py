"""Readiness: the FHIR server and every source's archive answer, and the state store is open."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import anyio.to_thread

from bridge.dicomweb.client import DicomwebClient
from bridge.errors import BridgeError
from bridge.fhir.client import FhirClient
from bridge.state.store import SqlStore

PROBE_TIMEOUT = 5.0


class ReadinessProbe:
    """Checks each dependency once, without retries, each within a few seconds."""

    def __init__(
        self,
        fhir: FhirClient,
        archives: Sequence[tuple[str, DicomwebClient]],
        store: SqlStore | None,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.fhir = fhir
        self.archives = list(archives)  # (source name, its archive's client), every source
        self.store = store
        self.timeout = timeout

    async def _check(self, probe: Awaitable[object], what: str) -> str:
        try:
            await asyncio.wait_for(probe, self.timeout)
        except TimeoutError:
            return f"{what} did not answer within {self.timeout:g} s"
        except BridgeError as exc:
            return f"{what} failed ({type(exc).__name__})"
        return "ok"

    async def _store(self) -> None:
        if self.store is None:
            raise _StoreClosed
        await anyio.to_thread.run_sync(self.store.ping)

    async def check(self) -> dict[str, str]:
        """Each dependency -> "ok" or why it is not ready; "dicomweb" is "ok" only when every archive is."""
        several = len(self.archives) > 1
        fhir, store, *archives = await asyncio.gather(
            self._check(self.fhir.capabilities(), "the FHIR server"),
            self._check(self._store(), "the state store"),
            *(
                self._check(
                    client.ping(),
                    f"the DICOMweb archive of source {name}" if several else "the DICOMweb archive",
                )
                for name, client in self.archives
            ),
        )
        failed = [answer for answer in archives if answer != "ok"]
        return {"fhir": fhir, "dicomweb": "; ".join(failed) or "ok", "store": store}


class _StoreClosed(BridgeError):
    """The store could not be opened at start-up."""
