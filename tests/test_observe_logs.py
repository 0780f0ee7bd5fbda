"""The runtime's log pipeline on real ``logging`` records: every way a secret can reach a line is
scrubbed before any formatter sees it, and both formats carry the fields operators filter on."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from sandboxd.runtime.observe import logs
from sandboxd.runtime.observe.metrics import bounded, status_label

TOKEN = "Zq0KtICXhqFUZdOy9_7mISbPk-e3cdfa"
API_KEY = "e2b_" + "0123456789abcdef" * 2 + "01234567"


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logs.Secrets, logs.RecentErrors]]:
    """The runtime's logging set up in JSON on a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    known = logs.Secrets()
    recent = logs.configure("json", known)
    output = io.StringIO()
    stream = next(h for h in root.handlers if isinstance(h, logging.StreamHandler))
    assert isinstance(stream, logging.StreamHandler)
    stream.setStream(output)
    try:
        yield logging.getLogger("sandboxd.runtime.test"), output, known, recent
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def _lines(output: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.getvalue().splitlines() if line.startswith("{")]


def test_known_secrets_are_scrubbed_everywhere(
    capture: tuple[logging.Logger, io.StringIO, logs.Secrets, logs.RecentErrors],
) -> None:
    log, output, known, recent = capture
    known.add(TOKEN)
    known.add("my-own-api-key-value")
    log.info("token %s in the arguments", TOKEN)
    log.warning("key in the message: my-own-api-key-value", extra={"event": "x.y", "detail": f"extra {TOKEN}"})
    try:
        raise ValueError(f"an exception naming {TOKEN}")
    except ValueError:
        log.exception("failed", extra={"sandbox_id": "abc"})
    text = output.getvalue()
    assert TOKEN not in text and "my-own-api-key-value" not in text
    lines = _lines(output)
    assert [line["message"] for line in lines] == [
        "token [redacted] in the arguments",
        "key in the message: [redacted]",
        "failed",
    ]
    assert lines[1]["detail"] == "extra [redacted]" and lines[1]["event"] == "x.y"
    assert "an exception naming [redacted]" in str(lines[2]["exc_info"])
    assert lines[2]["sandbox_id"] == "abc"
    assert lines[0]["event"] == "sandboxd.runtime.test"  # a record without an event is named by its logger
    # The recent errors keep only warnings and errors, scrubbed too.
    assert [r["message"] for r in recent.records] == ["key in the message: [redacted]", "failed"]
    known.discard(TOKEN)
    log.info("after the sandbox ended: %s", TOKEN)
    assert TOKEN in output.getvalue().splitlines()[-1]


@pytest.mark.parametrize(
    "line",
    [
        f"X-Access-Token: {TOKEN}",
        f"x-api-key={TOKEN}",
        f'{{"envdAccessToken": "{TOKEN}", "other": 1}}',
        f"GET /files?path=/a&signature=v1_{TOKEN}&signature_expiration=1",
        f"Authorization: Bearer {TOKEN}",
        f"the key {API_KEY} leaked",
    ],
)
def test_secret_shapes_are_scrubbed_unregistered(
    capture: tuple[logging.Logger, io.StringIO, logs.Secrets, logs.RecentErrors], line: str
) -> None:
    log, output, _, _ = capture
    log.info(line)
    (record,) = _lines(output)
    assert TOKEN not in str(record["message"]) and API_KEY not in str(record["message"])
    assert "[redacted]" in str(record["message"])


def test_json_and_text_lines_carry_the_fields(
    capture: tuple[logging.Logger, io.StringIO, logs.Secrets, logs.RecentErrors],
) -> None:
    log, output, _, _ = capture
    token = logs.REQUEST_ID.set("req-1")
    try:
        log.info("created", extra={"event": "sandbox.created", "sandbox_id": "sbx1", "duration_ms": 12.5})
    finally:
        logs.REQUEST_ID.reset(token)
    log.info("no request", extra={"request_id": None})
    first, second = _lines(output)
    assert first["time"] and str(first["time"]).endswith("Z")
    assert (first["level"], first["event"], first["message"]) == ("INFO", "sandbox.created", "created")
    assert (first["sandbox_id"], first["request_id"], first["duration_ms"]) == ("sbx1", "req-1", 12.5)
    assert second["request_id"] is None and second["sandbox_id"] is None

    record = logging.LogRecord("sandboxd.x", logging.WARNING, __file__, 1, "died %s", ("now",), None)
    record.event = "sandbox.died"
    record.sandbox_id = "sbx2"
    logs.Redactor(logs.Secrets()).filter(record)
    line = logs.TextLines().format(record)
    assert line.endswith(" WARNING sandbox.died died now sandbox_id=sbx2")


def test_label_values_are_bounded() -> None:
    assert [status_label(s) for s in (200, 404, 502, 418, 299, 0, 999)] == [
        "200",
        "404",
        "502",
        "4xx",
        "2xx",
        "aborted",
        "aborted",
    ]
    assert bounded("api", ("api", "timeout")) == "api"
    assert bounded("anything a client sent", ("api", "timeout")) == "other"


def _scrub_everything(values: list[str], text: str) -> str:
    """The scrub without its fast paths: every value searched for and the shapes run on every text."""
    for value in values:
        text = text.replace(value, logs.REDACTED)
    return logs._SHAPES.sub(lambda m: (m.group(1) or "") + logs.REDACTED, text)


@pytest.mark.parametrize(
    "text",
    [
        "sandbox.created",  # shorter than every value, no shape: both fast paths
        "created from template base in 21 ms",
        TOKEN,  # exactly a value's length
        f"a{TOKEN}",
        "my-own-api-key-value",  # the shortest value, alone
        "key my-own-api-key-value and " + TOKEN,
        f"X-Access-Token: {TOKEN}",
        f"x-api-key={TOKEN}",
        f'{{"envdAccessToken" : "{TOKEN}"}}',
        f"GET /files?path=/a&SIGNATURE=v1_{TOKEN}",
        f"AUTHORIZATION: Basic {TOKEN}",
        f"password= {TOKEN}",
        f"the key {API_KEY} leaked",
        f"the key {API_KEY.upper().replace('E2B_', 'E2b_')} leaked",  # the shapes ignore case, so must the check
        f"sk_e2b_{'a1' * 12} in a line",
        f"{API_KEY}",
        "e2b_ but too short to be a key",
        "x: y",
        "",
    ],
)
@pytest.mark.parametrize("live", [0, 300])
def test_the_scrubs_fast_paths_leave_what_the_full_scrub_leaves(text: str, live: int) -> None:
    """``Secrets.scrub`` skips the value search for a text shorter than every value and the shapes for
    a text that holds none of their required characters: on each kind of text, with ``live`` other
    tokens registered beside the two, it returns exactly what searching for everything returns."""
    others = [f"{i:04d}" + TOKEN[4:] for i in range(live)]  # TOKEN's length, and its tail
    values = [TOKEN, "my-own-api-key-value", *others]
    known = logs.Secrets()
    for value in values:
        known.add(value)
    assert known.scrub(text) == _scrub_everything(values, text)
    assert known.scrub(f"{others[7]} {text}" if others else text) == _scrub_everything(
        values, f"{others[7]} {text}" if others else text
    )
    known.discard("my-own-api-key-value")  # the shortest goes: a text of its length is not searched now
    assert known.scrub(text) == _scrub_everything([TOKEN, *others], text)
