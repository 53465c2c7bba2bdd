"""Log lines cannot be forged: whatever a logged value holds, a plain-text
record stays on one line and a traceback's lines are marked as its continuation."""

from __future__ import annotations

import json
import logging
import sys

from segmentation.logs import LineFormatter

FORGED = "2026-01-01T00:00:00 error   consumer: forged line"
HOSTILE = f"x\n{FORGED}\r\x1b[2J\u2028\x85\t\x00"


def formatted(as_json: bool, msg: str, *args: object, error: BaseException | None = None,
              extra: dict[str, object] | None = None) -> str:
    """One record as the service's formatter writes it (``extra`` as ``log.info(..., extra=)``)."""
    exc_info = (type(error), error, error.__traceback__) if error is not None else None
    record = logging.LogRecord("segmentation.test", logging.ERROR, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra or {})
    return LineFormatter(as_json).format(record)


def test_a_plain_text_record_with_hostile_fields_stays_one_line_with_every_character_escaped() -> None:
    line = formatted(False, "bundle field %s refused", HOSTILE, extra={"field": HOSTILE, f"k{HOSTILE}": 1})
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert line.isprintable()
    escaped = r"x\n" + FORGED + r"\r\x1b[2J\u2028\x85\t\x00"
    assert f"bundle field {escaped} refused" in line
    assert f"field={escaped}" in line and f"k{escaped}=1" in line


def test_printable_text_is_left_as_it_is() -> None:
    line = formatted(False, "segment %s published", "Deal hunters ($_$) é 名", extra={"version": 3})
    assert line.endswith("segmentation.test: segment Deal hunters ($_$) é 名 published version=3")


def test_a_traceback_follows_its_record_and_none_of_its_lines_passes_for_a_record() -> None:
    try:
        raise ValueError(HOSTILE)
    except ValueError as exc:
        error = exc
    first, *rest = formatted(False, "scoring failed", error=error).split("\n")
    assert first.endswith("segmentation.test: scoring failed")
    assert rest[0] == "| Traceback (most recent call last):"
    assert all(line.startswith("| ") and line.isprintable() for line in rest)
    assert any(line.startswith(f"| {FORGED}") for line in rest)  # there, marked as the traceback


def test_json_records_keep_the_values_exactly() -> None:
    record = json.loads(formatted(True, "bundle field %s refused", HOSTILE, extra={"field": HOSTILE}))
    assert record["msg"] == f"bundle field {HOSTILE} refused" and record["field"] == HOSTILE


def test_the_service_logs_through_this_formatter() -> None:
    from segmentation import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO")
        assert [type(h.formatter) for h in root.handlers] == [LineFormatter]
        assert root.handlers[0].stream is sys.stderr  # type: ignore[attr-defined]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
