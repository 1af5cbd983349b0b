"""The floor: the bridge's QIDO and FHIR requests for a full sync, with no mapping, validation or state.

A bare asyncio + httpx script that makes the requests a first full sync by the bridge makes, in
the same order and with the same concurrency, and nothing else:

- QIDO: one study-level page per ``page_size`` studies (same includefield list, limit/offset) and
  one series-level query per study;
- FHIR: one PUT of the Endpoint to a client id; per patient, one conditional create
  (POST with If-None-Exist), made once per patient per run (patient policy ``match-or-create``;
  none with ``logical``); per study, one PUT of the ImagingStudy to a client id (a UUID derived
  from the Study Instance UID), its body assembled straight from the DICOM JSON.

With ``--mode page-batched`` it makes the requests of the page-batched floor instead: per page of
studies, one series-level QIDO naming all of the page's studies (UID-list matching, paged by 1,000
series) grouped by study, one FHIR ``batch`` Bundle of conditional Patient creates for the page's
new patients (de-duplicated), and one ``batch`` Bundle of the page's ImagingStudy PUTs.

No pydicom, no fhir.resources, no database: the difference between the bridge and this script is
what the bridge's own work costs. It is run by ``benchmarks/sync.py`` in a child process like the
bridge; it can also be run alone against a running archive and FHIR server.

Run:  python -m benchmarks.floor --dicomweb URL --fhir URL [--concurrency 4] [--page-size 100]
          [--patient-policy match-or-create|logical] [--mode per-study|page-batched] [--json]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from benchmarks._meter import Meter

# The attributes the bridge asks for (bridge.mapping.records STUDY_FIELDS / SERIES_FIELDS);
# written out here so the floor imports nothing of the bridge.
STUDY_FIELDS = (
    "0020000D", "00080020", "00080030", "00080201", "00080050", "00080051", "00081030", "00080061",
    "00201206", "00201208", "00100010", "00100020", "00100021", "00100030", "00100040",
)  # fmt: skip
SERIES_FIELDS = (
    "0020000E", "00200011", "00080060", "0008103E", "00201209", "00180015", "00200060", "00080021",
    "00080031",
)  # fmt: skip
ACCEPT = "application/dicom+json, application/json;q=0.9"
FHIR_JSON = "application/fhir+json"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
TAG = {"system": "urn:fhir-dicomweb-bridge:source", "code": "floor"}
NAMESPACE = uuid.UUID("6f1c2d4e-8a0b-4c3d-9e5f-7a8b9c0d1e2f")
BODY_SITE = {  # enough of PS3.16 Annex L for the benchmark archive
    "CHEST": "51185008",
    "ABDOMEN": "818981001",
    "PELVIS": "816092008",
    "HEAD": "69536005",
}


def _value(row: dict[str, Any], tag: str) -> Any:
    values = (row.get(tag) or {}).get("Value") or [None]
    return values[0]


def _started(date: str | None, time_: str | None) -> str | None:
    if not date:
        return None
    day = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    if not time_:
        return day
    return f"{day}T{time_[:2]}:{time_[2:4]}:{time_[4:6] or '00'}Z"


def imaging_study(
    row: dict[str, Any], series: list[dict[str, Any]], subject: dict[str, Any], endpoint: str
) -> dict[str, Any]:
    """An ImagingStudy assembled directly from QIDO rows (no checks)."""
    uid = _value(row, "0020000D")
    resource_: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": str(uuid.uuid5(NAMESPACE, uid)),
        "meta": {"tag": [TAG]},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": subject,
    }
    accession = _value(row, "00080050")
    if accession:
        resource_["identifier"].append(
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "value": accession,
            }
        )
    started = _started(_value(row, "00080020"), _value(row, "00080030"))
    if started:
        resource_["started"] = started
    modalities = sorted({_value(s, "00080060") for s in series if _value(s, "00080060")})
    resource_["modality"] = [{"system": DCM, "code": m} for m in modalities]
    resource_["endpoint"] = [{"reference": endpoint}]
    for key, tag in (("numberOfSeries", "00201206"), ("numberOfInstances", "00201208")):
        if _value(row, tag) is not None:
            resource_[key] = int(_value(row, tag))
    if _value(row, "00081030"):
        resource_["description"] = _value(row, "00081030")
    out = []
    for s in series:
        item: dict[str, Any] = {"uid": _value(s, "0020000E")}
        if _value(s, "00200011") is not None:
            item["number"] = int(_value(s, "00200011"))
        item["modality"] = {"system": DCM, "code": _value(s, "00080060")}
        if _value(s, "0008103E"):
            item["description"] = _value(s, "0008103E")
        if _value(s, "00201209") is not None:
            item["numberOfInstances"] = int(_value(s, "00201209"))
        code = BODY_SITE.get(_value(s, "00180015") or "")
        if code:
            item["bodySite"] = {"system": "http://snomed.info/sct", "code": code}
        series_started = _started(_value(s, "00080021"), _value(s, "00080031"))
        if series_started:
            item["started"] = series_started
        out.append(item)
    if out:
        resource_["series"] = out
    return resource_


def patient(row: dict[str, Any], system: str) -> dict[str, Any]:
    """A minimal Patient from the study row."""
    name = (_value(row, "00100010") or {}).get("Alphabetic", "")
    family, _, given = name.partition("^")
    out: dict[str, Any] = {
        "resourceType": "Patient",
        "meta": {"tag": [TAG]},
        "identifier": [{"system": system, "value": _value(row, "00100020")}],
    }
    if name:
        out["name"] = [{"family": family, **({"given": [given]} if given else {})}]
    sex = _value(row, "00100040")
    if sex:
        out["gender"] = {"M": "male", "F": "female", "O": "other"}.get(sex, "unknown")
    birth = _value(row, "00100030")
    if birth:
        out["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}"
    return out


class Floor:
    """The requests of a full sync, nothing more."""

    def __init__(
        self,
        dicomweb: httpx.AsyncClient,
        dicomweb_url: str,
        fhir: httpx.AsyncClient,
        fhir_url: str,
        *,
        concurrency: int,
        page_size: int,
        patient_policy: str,
        patient_system: str,
        mode: str = "per-study",
    ) -> None:
        self.dicomweb, self.base = dicomweb, dicomweb_url.rstrip("/")
        self.fhir, self.fhir_base = fhir, fhir_url.rstrip("/")
        self.concurrency, self.page_size = concurrency, page_size
        self.policy, self.system = patient_policy, patient_system
        self.patients: dict[str, str] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.studies = 0
        self.mode = mode

    async def qido(self, path: str, fields: tuple[str, ...], offset: int) -> list[dict[str, Any]]:
        """One QIDO page."""
        params = [("includefield", f) for f in fields] + [
            ("limit", str(self.page_size)),
            ("offset", str(offset)),
        ]
        try:
            response = await self.dicomweb.get(
                f"{self.base}{path}",
                params=params,
                headers={"Accept": ACCEPT, "Accept-Encoding": "gzip, deflate"},
            )
        except httpx.TransportError:
            # Orthanc closes a keep-alive connection left idle during a long FHIR batch; the
            # bridge retries that too, so the floor may.
            response = await self.dicomweb.get(
                f"{self.base}{path}",
                params=params,
                headers={"Accept": ACCEPT, "Accept-Encoding": "gzip, deflate"},
            )
        response.raise_for_status()
        return response.json() if response.content.strip() else []  # type: ignore[no-any-return]

    async def put(self, body: dict[str, Any]) -> None:
        """PUT a resource to its client id."""
        response = await self.fhir.put(
            f"{self.fhir_base}/{body['resourceType']}/{body['id']}",
            content=json.dumps(body).encode(),
            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON},
        )
        response.raise_for_status()

    async def subject(self, row: dict[str, Any]) -> dict[str, Any]:
        """The subject Reference: one conditional create per patient per run."""
        pid = _value(row, "00100020")
        if self.policy == "logical":
            return {"type": "Patient", "identifier": {"system": self.system, "value": pid}}
        async with self.locks.setdefault(pid, asyncio.Lock()):
            if pid not in self.patients:
                response = await self.fhir.post(
                    f"{self.fhir_base}/Patient",
                    content=json.dumps(patient(row, self.system)).encode(),
                    headers={
                        "Accept": FHIR_JSON,
                        "Content-Type": FHIR_JSON,
                        "If-None-Exist": urlencode({"identifier": f"{self.system}|{pid}"}),
                    },
                )
                response.raise_for_status()
                location = response.headers.get("Location") or response.headers["Content-Location"]
                parts = location.split("/")
                self.patients[pid] = parts[parts.index("_history") - 1] if "_history" in parts else parts[-1]
        return {"reference": f"Patient/{self.patients[pid]}"}

    async def study(self, row: dict[str, Any], endpoint: str, limit: asyncio.Semaphore) -> None:
        """Series query, subject, ImagingStudy PUT."""
        async with limit:
            uid = _value(row, "0020000D")
            series = await self.qido(f"/studies/{quote(uid, safe='')}/series", SERIES_FIELDS, 0)
            subject = await self.subject(row)
            await self.put(imaging_study(row, series, subject, endpoint))
            self.studies += 1

    async def series_of_page(self, uids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The page's series in one UID-list query (paged by 1,000 series), grouped by study."""
        grouped: dict[str, list[dict[str, Any]]] = {uid: [] for uid in uids}
        offset = 0
        while True:
            params = [("includefield", f) for f in ("0020000D", *SERIES_FIELDS)] + [
                ("StudyInstanceUID", ",".join(uids)),
                ("limit", "1000"),
                ("offset", str(offset)),
            ]
            response = await self.dicomweb.get(
                f"{self.base}/series",
                params=params,
                headers={"Accept": ACCEPT, "Accept-Encoding": "gzip, deflate"},
            )
            response.raise_for_status()
            rows = response.json() if response.content.strip() else []
            for row in rows:
                grouped.setdefault(_value(row, "0020000D"), []).append(row)
            if len(rows) < 1000:
                return grouped
            offset += len(rows)

    async def batch(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST one batch Bundle; its answer entries."""
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        response = await self.fhir.post(
            self.fhir_base,
            content=json.dumps(bundle).encode(),
            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON, "Prefer": "return=minimal"},
        )
        response.raise_for_status()
        answer: list[dict[str, Any]] = response.json().get("entry", [])
        return answer

    async def page_batched(self, rows: list[dict[str, Any]], endpoint: str) -> None:
        """One page: one series query, one batch of Patients, one batch of ImagingStudies."""
        series = await self.series_of_page([_value(r, "0020000D") for r in rows])
        if self.policy != "logical":
            new: dict[str, dict[str, Any]] = {}
            for row in rows:
                pid = _value(row, "00100020")
                if pid not in self.patients and pid not in new:
                    new[pid] = row
            if new:
                answers = await self.batch(
                    [
                        {
                            "resource": patient(row, self.system),
                            "request": {
                                "method": "POST",
                                "url": "Patient",
                                "ifNoneExist": urlencode({"identifier": f"{self.system}|{pid}"}),
                            },
                        }
                        for pid, row in new.items()
                    ]
                )
                for pid, answer in zip(new, answers, strict=True):
                    parts = answer["response"]["location"].split("/")
                    self.patients[pid] = (
                        parts[parts.index("_history") - 1] if "_history" in parts else parts[-1]
                    )
        entries = []
        for row in rows:
            resource_ = imaging_study(
                row, series.get(_value(row, "0020000D"), []), await self.subject(row), endpoint
            )
            entries.append(
                {
                    "resource": resource_,
                    "request": {"method": "PUT", "url": f"ImagingStudy/{resource_['id']}"},
                }
            )
        await self.batch(entries)
        self.studies += len(rows)

    async def run(self) -> None:
        """The whole pass."""
        endpoint_id = str(uuid.uuid5(NAMESPACE, "endpoint"))
        await self.put(
            {
                "resourceType": "Endpoint",
                "id": endpoint_id,
                "meta": {"tag": [TAG]},
                "identifier": [{"system": "urn:fhir-dicomweb-bridge:source", "value": "floor"}],
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "name": "DICOMweb WADO-RS (floor)",
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "payloadMimeType": ["application/dicom"],
                "address": self.base,
            }
        )
        endpoint = f"Endpoint/{endpoint_id}"
        limit = asyncio.Semaphore(self.concurrency)
        offset = 0
        while True:
            rows = await self.qido("/studies", STUDY_FIELDS, offset)
            if self.mode == "page-batched":
                if rows:
                    await self.page_batched(rows, endpoint)
                if len(rows) < self.page_size:
                    return
                offset += len(rows)
                continue
            async with asyncio.TaskGroup() as group:
                for row in rows:
                    group.create_task(self.study(row, endpoint, limit))
            if len(rows) < self.page_size:
                return
            offset += len(rows)


async def sync(
    args: argparse.Namespace, hooks: dict[str, dict[str, list[Any]]] | None = None
) -> dict[str, Any]:
    """One floor pass; ``hooks`` are httpx event hooks per side (``dicomweb``, ``fhir``)."""
    hooks = hooks or {}
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 4)
    async with (
        httpx.AsyncClient(timeout=60.0, limits=limits, event_hooks=hooks.get("dicomweb")) as dicomweb,
        httpx.AsyncClient(timeout=60.0, limits=limits, event_hooks=hooks.get("fhir")) as fhir,
    ):
        floor = Floor(
            dicomweb,
            args.dicomweb,
            fhir,
            args.fhir,
            concurrency=args.concurrency,
            page_size=args.page_size,
            patient_policy=args.patient_policy,
            patient_system=args.patient_system,
            mode=args.mode,
        )
        started = time.perf_counter()
        await floor.run()
        wall = time.perf_counter() - started
    return {"wall": wall, "studies": floor.studies, "patients": len(floor.patients)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicomweb", required=True, help="DICOMweb base URL")
    parser.add_argument("--fhir", required=True, help="FHIR base URL")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="studies at once (as BRIDGE_SYNC_CONCURRENCY)"
    )
    parser.add_argument(
        "--page-size", type=int, default=100, help="QIDO page size (as BRIDGE_QIDO_PAGE_SIZE)"
    )
    parser.add_argument("--patient-policy", choices=("match-or-create", "logical"), default="match-or-create")
    parser.add_argument("--patient-system", default="urn:oid:1.2.826.0.1.3680043.10.1000")
    parser.add_argument(
        "--mode",
        choices=("per-study", "page-batched"),
        default="per-study",
        help="one series query and one FHIR PUT per study, or one series query and FHIR batch per page",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one pass and print its figures."""
    args = parse_args(argv)
    meter = Meter()
    result = asyncio.run(sync(args, {side: meter.hooks(side) for side in ("dicomweb", "fhir")}))
    result["http"] = meter.figures()
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
