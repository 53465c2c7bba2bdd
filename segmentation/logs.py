"""Structured logs: one line per event of note, ``key=value`` or JSON, secrets never included.

A logged value can come from outside (a key read back, a bundle field name, an exception's
message), so no value may forge a line or drive the terminal. JSON lines escape by construction;
plain-text lines write every non-printable character as its Python escape (``\\n``,
``\\x1b``, ``\\u2028``), and a traceback follows its line with each of its lines behind ``| ``.
So every line that does not start with ``| `` is one record, and the service wrote it.
"""

from __future__ import annotations

import json
import logging
import sys

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class LineFormatter(logging.Formatter):
    """One record per line: ``ts level logger: message key=value ...``, or a JSON object."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        base = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            base["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps({**base, **fields}, default=str)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{base['ts']} {base['level']:<7} {base['logger']}: {base['msg']}"
        line = escape(f"{line} {extra}" if extra else line)
        return f"{line}\n{continuation(base['exc'])}" if "exc" in base else line


def escape(text: str) -> str:
    """``text`` on one line: each non-printable character (a line break, an escape sequence, a
    Unicode line separator) as it would appear in ``repr``; everything else as is.

    >>> print(escape("bundle field 'x\\n2026-01-01T00:00:00 info forged: \\x1b[31m\\u2028' é"))
    bundle field 'x\\n2026-01-01T00:00:00 info forged: \\x1b[31m\\u2028' é
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def continuation(text: str) -> str:
    """A multi-line text (a traceback) that follows a record: each of its lines escaped and behind
    ``| ``, so none of them can pass for a record of its own.

    >>> print(continuation("Traceback:\\nValueError: x\\n2026-01-01 info forged: y\\r"))
    | Traceback:
    | ValueError: x
    | 2026-01-01 info forged: y\\r
    """
    return "\n".join(f"| {escape(line)}" for line in text.split("\n"))


def configure(level: str = "INFO", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
