"""The agent's HTTP dates (``sandboxd.agent.httpdate``) against ``email.utils``, which they replace in
the agent for its memory (issue 16): the same text out, the same instant read back."""

from __future__ import annotations

import email.utils
import random
import time

import pytest
from sandboxd.agent.httpdate import format_http_date, parse_http_date

INSTANTS = [
    0.0,
    0.999,
    784111777.0,  # RFC 9110's example, Sun, 06 Nov 1994 08:49:37 GMT
    951782400.0,  # 29 Feb 2000
    4107542399.0,  # 31 Dec 2099 23:59:59
    253402300799.0,  # 31 Dec 9999 23:59:59, the last four-digit year
    time.time(),
    *(random.Random(16).uniform(0, 4e9) for _ in range(2000)),
]


@pytest.mark.parametrize("instant", INSTANTS[:7])
def test_format_is_email_utils_formatdate(instant: float) -> None:
    assert format_http_date(instant) == email.utils.formatdate(instant, usegmt=True)


def test_format_and_parse_agree_with_email_utils_over_many_instants() -> None:
    for instant in INSTANTS:
        text = format_http_date(instant)
        assert text == email.utils.formatdate(instant, usegmt=True)
        assert parse_http_date(text) == email.utils.parsedate_to_datetime(text).timestamp() == float(int(instant))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),
        ("  Sun, 06 Nov 1994 08:49:37 GMT ", 784111777.0),
        ("Mon, 06 Nov 1994 08:49:37 GMT", 784111777.0),  # a wrong weekday is ignored, as email.utils does
        ("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),  # RFC 850, obsolete but to be accepted
        ("Sun Nov  6 08:49:37 1994", 784111777.0),  # asctime, no zone: UTC
        ("Sun, 06 Nov 1994 09:49:37 +0100", 784111777.0),  # not HTTP's form, but email.utils reads it
        ("Mon, 31 Feb 2020 00:00:00 GMT", None),
        ("Sun, 06 Nov 1994 24:00:00 GMT", None),
        ("Sun, 06 Nov 1994 08:49:37", 784111777.0),
        ("Sun, 06 Xyz 1994 08:49:37 GMT", None),
        ("Sun, \uff10\uff16 Nov 1994 08:49:37 GMT", 784111777.0),  # fullwidth digits: email.utils int()s them
        ("", None),
        ("garbage", None),
        ("9" * 200, None),
        ("x, 1 Jan 99999999999999 00:00:00 GMT", None),  # past datetime's years: OverflowError there
    ],
)
def test_parse_reads_what_email_utils_reads(value: str, expected: float | None) -> None:
    assert parse_http_date(value) == expected
