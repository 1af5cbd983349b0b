"""DICOM DA/TM/offset values to FHIR dateTime strings."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from bridge.errors import MappingError

_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


def parse_date(value: str, attribute: str) -> date:
    """A DICOM DA (YYYYMMDD; the old YYYY.MM.DD form is accepted too)."""
    match = _DA.match(value.replace(".", "").strip())
    if not match:
        raise MappingError(f"{attribute} is not a DICOM date (YYYYMMDD)", attribute=attribute)
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError as exc:
        raise MappingError(f"{attribute} is not a calendar date", attribute=attribute) from exc


def _time(value: str, attribute: str) -> tuple[int, int, int, int, int]:
    """Hour, minute, second, microsecond and the number of fraction digits of a DICOM TM."""
    match = _TM.match(value.replace(":", "").strip())
    if not match:
        raise MappingError(f"{attribute} is not a DICOM time (HHMMSS.FFFFFF)", attribute=attribute)
    hour, minute, second = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    fraction = match[4] or ""
    # DICOM allows a leap second (60); FHIR's time does not, so it is clamped.
    if hour > 23 or minute > 59 or second > 60:
        raise MappingError(f"{attribute} is out of range", attribute=attribute)
    return hour, minute, min(second, 59), int(fraction.ljust(6, "0") or 0), len(fraction)


def _offset(value: str) -> timezone:
    match = _OFFSET.match(value.strip())
    if not match:
        raise MappingError(
            "TimezoneOffsetFromUTC is not of the form +HHMM/-HHMM",
            attribute="TimezoneOffsetFromUTC",
        )
    hours, minutes = int(match[2]), int(match[3])
    if hours > 14 or minutes > 59:
        raise MappingError("TimezoneOffsetFromUTC is out of range", attribute="TimezoneOffsetFromUTC")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if match[1] == "-" else delta)


def fhir_datetime(
    da: str | None,
    tm: str | None,
    tz_offset: str | None,
    *,
    zone: str | None = None,
    date_attribute: str = "StudyDate",
    time_attribute: str = "StudyTime",
) -> str | None:
    """A FHIR dateTime from DICOM date, time and offset; the date alone when there is no time.

    FHIR requires a zone whenever a time is given: the DICOM offset when present, else ``zone``
    (an IANA name), else the host's local zone, as DICOM says a time without offset is local.
    """
    if da is None:
        if tm is not None:
            _time(tm, time_attribute)  # still report a malformed time
        return None
    day = parse_date(da, date_attribute)
    if tm is None:
        return day.isoformat()
    hour, minute, second, micro, digits = _time(tm, time_attribute)
    naive = datetime(day.year, day.month, day.day, hour, minute, second, micro)
    if tz_offset is not None:
        aware = naive.replace(tzinfo=_offset(tz_offset))
    elif zone is not None:
        aware = naive.replace(tzinfo=ZoneInfo(zone))
    else:
        aware = naive.astimezone()  # the host's zone, with its DST rule for that date
    text = aware.isoformat(timespec="microseconds" if digits else "seconds")
    if digits:  # keep the precision the archive gave, no more
        head, _, rest = text.partition(".")
        text = f"{head}.{rest[:digits]}{rest[6:]}"
    return text
