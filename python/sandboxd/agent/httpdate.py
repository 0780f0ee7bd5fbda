"""HTTP dates (RFC 9110 §5.6.7): the IMF-fixdate a server sends (``Sun, 06 Nov 1994 08:49:37 GMT``),
and reading a date a client sends in ``If-Modified-Since``.

Why not ``email.utils`` (``formatdate(usegmt=True)``, ``parsedate_to_datetime``), which gives the same
answers: importing it brings the ``email`` package's charset and encoder modules into the standalone
agent (issue 16: what it imports is its memory), for two lines of formatting. The
obsolete forms a recipient must also accept (RFC 850 and asctime dates) are rare enough that
:func:`parse_http_date` hands them to ``email.utils``, imported then.
"""

from __future__ import annotations

import time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name: number for number, name in enumerate(_MONTHS, 1)}


def format_http_date(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch, fraction dropped) as an IMF-fixdate, in GMT:
    what ``email.utils.formatdate(timestamp, usegmt=True)`` returns."""
    t = time.gmtime(timestamp)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def parse_http_date(value: str) -> float | None:
    """Seconds since the epoch of an HTTP date, or None when ``value`` is not one. IMF-fixdate is
    read here; anything else goes to ``email.utils.parsedate_to_datetime``, which also reads RFC 850
    and asctime dates (a date without a zone is taken as UTC, as RFC 9110 says)."""
    fixdate = _parse_imf_fixdate(value.strip())
    if fixdate is not None:
        return fixdate
    import email.utils  # only for the obsolete forms: see the module documentation

    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # a year past datetime's
        return None
    if parsed.tzinfo is None:  # "-0000", or no zone: RFC 9110 dates are in UTC
        from datetime import UTC

        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _parse_imf_fixdate(value: str) -> float | None:
    """``Sun, 06 Nov 1994 08:49:37 GMT`` to seconds since the epoch; None for any other shape or a
    field out of range (the weekday is not checked, as ``email.utils`` does not)."""
    parts = value.split(" ")
    if len(parts) != 6 or parts[5] != "GMT" or parts[0][:-1] not in _DAYS or not parts[0].endswith(","):
        return None
    day, month, year, clock = parts[1], _MONTH_NUMBER.get(parts[2]), parts[3], parts[4].split(":")
    if month is None or len(day) != 2 or len(year) != 4 or len(clock) != 3 or any(len(c) != 2 for c in clock):
        return None
    fields = (year, day, *clock)
    if not all(field.isascii() and field.isdigit() for field in fields):
        return None
    hour, minute, second = (int(c) for c in clock)
    timestamp = _days_since_epoch(int(year), month, int(day)) * 86400 + hour * 3600 + minute * 60 + second
    # Out-of-range fields (31 Feb, 24:00, a leap second) do not come back the same: not ours to read.
    return float(timestamp) if format_http_date(timestamp)[5:] == value[5:] else None


def _days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a date of the proleptic Gregorian calendar (``calendar.timegm``'s
    arithmetic, without importing ``calendar`` and the ``locale`` it brings)."""
    if month <= 2:
        year -= 1
    era, year_of_era = divmod(year, 400)
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468
