"""The settings reference (``docs/settings.md``), generated from ``Settings`` so that it cannot
drift from the code: ``python -m segmentation.settings_table > docs/settings.md`` (``make docs``);
a test fails when the committed file is stale."""

from __future__ import annotations

import json
from typing import Any

from pydantic.fields import FieldInfo

from segmentation.settings import Settings

COMPUTED = {
    "transactional_id": "`segmentation-<host>-<pid>-<random>`",
    "replica_id": "host name",
}

HEADER = """# Settings

Generated from `segmentation/settings.py` by `make docs`; do not edit by hand.

One frozen pydantic-settings object, env prefix `SEG_`, defaults pointing at the local stack.
Lists and dicts are JSON (`SEG_FEATURES='["a","b"]'`); `null` sets a setting to none. librdkafka
options pass through `SEG_KAFKA_EXTRA` (e.g. `'{"security.protocol":"SASL_SSL",
"sasl.mechanisms":"PLAIN","sasl.username":"svc"}'`); the password goes in `SEG_KAFKA_PASSWORD`
and is never logged. A wrong value stops the service at start with one line per setting.

| variable | default | meaning |
|---|---|---|
"""


def shown_default(name: str, field: FieldInfo) -> str:
    """The default as a reader would type it.

    >>> from pydantic import Field
    >>> shown_default("k", Field(5)), shown_default("x", Field(None)), shown_default("f", Field(("a",)))
    ('`5`', 'none', '`["a"]`')
    """
    if name in COMPUTED:
        return COMPUTED[name]
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list | dict):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def markdown() -> str:
    rows = [
        f"| `SEG_{name.upper()}` | {shown_default(name, field)} | {field.description or ''} |"
        for name, field in Settings.model_fields.items()
    ]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
