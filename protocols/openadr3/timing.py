"""OpenADR 3 time values: RFC 3339 date-times and ISO 8601 durations, with the spec's sentinels.

The definition (``intervalPeriod``) gives two sentinels, recognised here by value, not spelling:

- a start of ``0001-01-01`` or ``0001-01-01T00:00:00`` (any time on that day, any offset) means
  "now" (a "do it now" event, User Guide 7.3);
- a duration of ``P9999Y`` means infinity. Long forms (``P9999Y0M0DT0H0M0S``, ``P119988M``, the
  same span in days or weeks) mean the same: any duration at least as long as 9999 years of 365
  days (the shortest reading of ``P9999Y``) is infinite.

Nominal lengths: a year is 365.2425 days, a month a twelfth of that, a week 7 days; the User
Guide advises against months for this reason. Negative durations parse (the pattern allows a
minus) and are refused by the callers that place things in time.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta

DAY_S = 86_400.0
YEAR_S = 365.2425 * DAY_S
MONTH_S = YEAR_S / 12.0
INFINITE_S = 9999 * 365 * DAY_S  # at least this long is the P9999Y sentinel
_DURATION = re.compile(
    r"^(-?)P(?=\d|T\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)([DW]))?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)
_NOW_DAY = date(1, 1, 1)


class TimeValueError(ValueError):
    """A date-time or duration that cannot be read."""


def duration_s(text: object) -> float:
    """Return an ISO 8601 duration in seconds (math.inf for the P9999Y sentinel and its long forms)."""
    if not isinstance(text, str):
        raise TimeValueError(f"duration {text!r} is not a string")
    m = _DURATION.match(text.strip())
    if m is None:
        raise TimeValueError(f"duration {text!r} is not ISO 8601 (PnYnMnDTnHnMnS)")
    sign, years, months, days, unit, hours, minutes, seconds = m.groups()
    total = (
        int(years or 0) * YEAR_S
        + int(months or 0) * MONTH_S
        + int(days or 0) * (7 if unit == "W" else 1) * DAY_S
        + int(hours or 0) * 3600.0
        + int(minutes or 0) * 60.0
        + float(seconds or 0.0)
    )
    if total >= INFINITE_S:
        total = math.inf
    return -total if sign else total


def format_duration(seconds: float) -> str:
    """Return seconds as an ISO 8601 duration (``P9999Y`` for infinity)."""
    if math.isinf(seconds):
        return "P9999Y"
    whole = int(seconds)
    frac = seconds - whole
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = "P" + (f"{days}D" if days else "")
    time_part = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if secs or frac or not (days or hours or minutes):
        time_part += f"{secs + frac:g}S" if frac else f"{secs}S"
    return out + ("T" + time_part if time_part else "")


def parse_datetime(text: object) -> datetime | None:
    """Return an aware UTC date-time, or None for the "now" sentinel (0001-01-01...)."""
    if not isinstance(text, str):
        raise TimeValueError(f"date-time {text!r} is not a string")
    raw = text.strip()
    if len(raw) == 10:  # a bare date: only the sentinel day is meaningful
        try:
            day = date.fromisoformat(raw)
        except ValueError as err:
            raise TimeValueError(f"date-time {text!r} is not RFC 3339") from err
        if day == _NOW_DAY:
            return None
        raise TimeValueError(f"date-time {text!r} has no time of day")
    try:
        value = datetime.fromisoformat(raw.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as err:
        raise TimeValueError(f"date-time {text!r} is not RFC 3339") from err
    if value.date() == _NOW_DAY:
        return None
    if value.tzinfo is None:
        raise TimeValueError(f"date-time {text!r} has no time zone offset")
    return value.astimezone(UTC)


def format_datetime(t: datetime) -> str:
    """Return an aware date-time as RFC 3339 UTC with milliseconds (``...T12:00:00.000Z``)."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_datetime(text: object) -> bool:
    """Return whether ``text`` is an RFC 3339 date-time or the spec's "now" sentinel (format check)."""
    try:
        parse_datetime(text)
    except TimeValueError:
        return False
    return True


def shift(t: datetime, seconds: float) -> datetime:
    """Return ``t`` plus seconds, saturating at the largest representable time."""
    try:
        return t + timedelta(seconds=seconds)
    except OverflowError:
        return datetime.max.replace(tzinfo=t.tzinfo) if seconds > 0 else datetime.min.replace(tzinfo=t.tzinfo)
